"""Dynamic visual-token pruning at inference (training-free, per sample), for LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

Two stages, after Yu, Chen, Xu (arXiv 2409.01162); our choices where the paper
is silent are options, with the defaults of ``shared/notes/token-pruning-spec.md``:

1. before the language model, keep each image's visual tokens most similar to
   the vision encoder's CLS token, cut at the knee of the sorted similarities
   (Qwen-VL towers have no CLS token: there the score is the attention a token's
   patches receive from the whole image, see ``qwen_vl.py``);
2. inside the language model, after ``layer`` decoder layers, keep the tokens
   that the question attends to, cut at the knee again. The system prompt (all
   tokens before the first image token) and the last token always stay.

Kept tokens keep their order and position ids; later layers and their KV cache
hold only the survivors; ``generate`` works. Works on any weights, TAMP-pruned
ones included.

    from tamp_modifier.token_pruning import enable_token_pruning, disable_token_pruning
    pruner = enable_token_pruning(model)          # spec defaults
    out = model.generate(**inputs, max_new_tokens=20)
    print(pruner.last)                            # kept counts per sample and stage
    disable_token_pruning(model)                  # the model is exactly as loaded again
"""

from __future__ import annotations

from tamp_modifier.token_pruning.accounting import SampleCounts, layer_flops, prefill_flops
from tamp_modifier.token_pruning.knee import KNEE_RULES, keep_mask, knee_count
from tamp_modifier.token_pruning.options import QWEN_SUPPORTED, TokenPruningOptions
from tamp_modifier.token_pruning.pruner import TokenPruner, attached_pruner, set_attached
from tamp_modifier.token_pruning.qwen_vl import QwenVLTokenPruner
from tamp_modifier.token_pruning.scores import (
    cls_attention,
    cls_cosine,
    group_mean,
    mean_cosine,
    patch_attention_received,
    received_attention,
)

__all__ = [
    "KNEE_RULES",
    "QwenVLTokenPruner",
    "SampleCounts",
    "TokenPruner",
    "TokenPruningOptions",
    "cls_attention",
    "cls_cosine",
    "disable_token_pruning",
    "enable_token_pruning",
    "fastv_options",
    "group_mean",
    "keep_mask",
    "knee_count",
    "layer_flops",
    "mean_cosine",
    "patch_attention_received",
    "prefill_flops",
    "received_attention",
]


def enable_token_pruning(
    model,
    *,
    stage1: bool = True,
    similarity: str = "attention",
    knee: str = "kneedle",
    min_tokens: int = 1,
    max_tokens: int | None = None,
    stage2: bool = True,
    layer: int = 2,
    stage2_knee: str | None = None,
    stage2_min_tokens: int = 1,
    stage2_max_tokens: int | None = None,
    stage2_queries: str = "question",
    stage2_candidates: str = "after_system",
    stage2_keep_ratio: float | None = None,
    verbose: bool = False,
) -> TokenPruner:
    """Turn on per-sample visual-token pruning for every later forward and ``generate`` of ``model``.

    Stage 1 (``stage1``): score each image's visual tokens by ``similarity`` to
    CLS in the vision layer the projector reads (``"attention"``: the CLS query's
    attention, heads averaged; ``"cosine"``: cosine of hidden states); keep the
    head before the ``knee`` (``"kneedle"``, ``"largest_drop"``, ``"iqr"``), at
    least ``min_tokens`` and at most ``max_tokens`` per image. On Qwen-VL (no CLS)
    ``"attention"`` means ``"received_attention"``: the mean attention a token's
    2x2 patches receive from every patch of their image in the tower's last block;
    ``"cosine"`` means ``"mean_cosine"``: each visual token's cosine to the image's
    mean token. Kept tokens keep their M-RoPE positions; only image tokens are
    candidates (video tokens pass whole).

    Stage 2 (``stage2``): layers ``0 .. layer-1`` see every stage-1 survivor; the
    attention of layer ``layer-1`` scores the candidates (``"after_system"``:
    every token after the system prompt but the last; ``"visual"``: image tokens
    only) by the mean attention they receive from ``stage2_queries``
    (``"question"``: the tokens after the last image token; ``"all"``); layers
    ``layer`` and later see the head before ``stage2_knee`` (default: ``knee``),
    clamped to ``[stage2_min_tokens, stage2_max_tokens]``, or a fixed share
    ``stage2_keep_ratio`` of the candidates.

    ``verbose`` logs the counts of each prefill at INFO (always at DEBUG).
    Returns the ``TokenPruner``; its ``last`` and ``records`` hold the kept
    counts per sample (``SampleCounts``). Raises ValueError for a model of another
    family (SigLIP towers such as SmolVLM, Gemma 3), for invalid options, and if
    pruning is already on.

        pruner = enable_token_pruning(model, knee="iqr", layer=3)
    """
    if attached_pruner(model) is not None:
        raise ValueError(
            "token pruning is already enabled on this model; call disable_token_pruning(model) first"
        )
    options = TokenPruningOptions(
        stage1=stage1, similarity=similarity, knee=knee, min_tokens=min_tokens, max_tokens=max_tokens,
        stage2=stage2, layer=layer, stage2_knee=stage2_knee, stage2_min_tokens=stage2_min_tokens,
        stage2_max_tokens=stage2_max_tokens, stage2_queries=stage2_queries,
        stage2_candidates=stage2_candidates, stage2_keep_ratio=stage2_keep_ratio, verbose=verbose,
    )
    cls = QwenVLTokenPruner if type(model).__name__ in QWEN_SUPPORTED else TokenPruner
    cls.check_model(model, options)
    pruner = cls(model, options)
    pruner.attach()
    set_attached(model, pruner)
    return pruner


def disable_token_pruning(model) -> TokenPruner | None:
    """Remove every hook ``enable_token_pruning`` added; returns its pruner (with its records), or None.

        disable_token_pruning(model)   # outputs are the unmodified model's again
    """
    pruner = attached_pruner(model)
    if pruner is not None:
        pruner.detach()
        set_attached(model, None)
    return pruner


def fastv_options(drop: float = 0.5, layer: int = 2) -> dict:
    """Options that make ``enable_token_pruning`` the FastV baseline: after ``layer`` layers,
    drop the share ``drop`` of visual tokens that receive the least attention (mean over
    all tokens that see them); no stage 1.

        enable_token_pruning(model, **fastv_options(0.5))
    """
    return dict(stage1=False, stage2=True, layer=layer, stage2_queries="all", stage2_candidates="visual",
                stage2_keep_ratio=1.0 - drop, stage2_min_tokens=0)
