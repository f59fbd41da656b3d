"""Stage 2, inside the language model: after layer ``layer - 1``, keep the tokens the question attends to.

Layers ``0 .. layer-1`` see every stage-1 survivor. The attention of layer
``layer - 1`` (the last one that sees them all) scores each candidate by the
mean attention it receives from the query tokens (``stage2_keep``: the
question, or every token); the head before the knee survives. The cut is applied
to that layer's output, so layers ``layer`` and later, and their KV cache, hold
only the survivors: each of them gets the survivors' RoPE tables and position
ids, and one causal mask sized to the shorter sequence (``pruned_layers_mask``),
in the prefill and in every decoding step after it. The system prompt (every
token before the first image token) and the last token are never dropped.

Under a non-eager attention kernel the layer returns no probabilities; they are
recomputed from its own q/k projections (``recompute_attention``).
"""

from __future__ import annotations

import sys

import torch

from tamp_modifier.token_pruning.forward_state import ForwardState, Phase
from tamp_modifier.token_pruning.knee import keep_mask
from tamp_modifier.token_pruning.options import TokenPruningOptions
from tamp_modifier.token_pruning.scores import received_attention
from tamp_modifier.token_pruning.token_drop import gather_tokens, repack

__all__ = ["Stage2", "check_stage2", "pruned_layers_mask", "recompute_attention", "stage2_keep"]


def check_stage2(model, options: TokenPruningOptions) -> None:
    """The checks of stage 2, which any decoder of Llama-style layers shares."""
    n = model.config.text_config.num_hidden_layers
    if options.stage2 and not 1 <= options.layer <= n - 1:
        raise ValueError(
            f"layer={options.layer}: stage 2 needs 1 <= layer <= {n - 1} for a language model of {n} "
            "layers (layers before it see every token, the attention of layer-1 scores them)"
        )
    if options.stage2 and model.config.text_config._attn_implementation != "eager":
        attn = model.model.language_model.layers[options.layer - 1].self_attn
        if hasattr(attn, "q_norm") or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "scaling")):
            raise ValueError(
                f"stage 2 reads attention probabilities; {type(attn).__name__} under "
                f"{model.config.text_config._attn_implementation!r} attention returns none, and its "
                "scores cannot be recomputed here. Load the model with attn_implementation='eager'"
            )


def stage2_keep(attention: torch.Tensor, valid: torch.Tensor, image: torch.Tensor,
                options: TokenPruningOptions) -> torch.Tensor:
    """``[B, L1]`` bool: the slots layers ``layer`` and later keep.

    ``attention``: ``[B, L1, L1]`` the scoring layer's probabilities, heads averaged;
    ``valid``/``image``: ``[B, L1]`` real and image slots. Every non-candidate real
    slot is kept; the candidates (see ``enable_token_pruning``) are cut at the knee
    of the attention they receive from the query tokens.
    """
    o = options
    b, n = valid.shape
    pos = torch.arange(n, device=valid.device).expand(b, n)
    has_image = (image & valid).any(1)
    first = torch.where(image & valid, pos, n).min(1).values
    last_img = torch.where(image & valid, pos, -1).max(1).values
    last = torch.where(valid, pos, -1).max(1).values
    if o.stage2_queries == "question":
        queries = valid & (pos > last_img[:, None])
    else:
        queries = valid.clone()
    scores = received_attention(attention, queries)
    if o.stage2_candidates == "after_system":
        cand = valid & (pos >= first[:, None]) & (pos != last[:, None])
    else:
        cand = valid & image & (pos != last[:, None])
    cand &= has_image[:, None]  # a text-only sample keeps every token
    keep = valid & ~cand
    rule = o.stage2_knee or o.knee
    for r in range(b):
        if cand[r].any():
            sel = keep_mask(scores[r][cand[r]], rule, o.stage2_min_tokens, o.stage2_max_tokens,
                            o.stage2_keep_ratio)
            keep[r, cand[r].nonzero()[:, 0][sel]] = True
    return keep


def recompute_attention(attn, q_proj: torch.Tensor, k_proj: torch.Tensor, position_embeddings,
                        valid: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``[B, H, L, L]`` of a Llama-style layer from the outputs of its own q/k
    projections (``[B, L, H*hd]``), with its RoPE, causal and over the ``valid`` keys only."""
    b, n, _ = q_proj.shape
    hd = attn.head_dim
    q = q_proj.view(b, n, -1, hd).transpose(1, 2)
    k = k_proj.view(b, n, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    idx = torch.arange(n, device=q_proj.device)
    allowed = (idx[:, None] >= idx[None, :])[None, None] & valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(logits.softmax(-1))


def pruned_layers_mask(config, hidden: torch.Tensor, mask2d: torch.Tensor, kwargs: dict, position_ids,
                       layer: int):
    """The attention mask of the layers after the cut, in the form the model's own layers take,
    built by transformers from the 2-D mask of their shorter sequence (and cache)."""
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=mask2d,
        past_key_values=kwargs.get("past_key_values"), position_ids=position_ids, layer_idx=layer,
    )


class Stage2:
    """The hooks of stage 2 on the decoder layers of one language model; they read and fill the
    ``Prefill`` (or read the ``DecodeStep``) of the shared ``ForwardState``."""

    def __init__(self, language_model, options: TokenPruningOptions, state: ForwardState, *, eager: bool):
        self.options, self.state, self.eager = options, state, eager
        self._lm = language_model
        self._layers = list(language_model.layers)
        self._qk = {}  # the scoring layer's q/k projections of this prefill (non-eager kernels only)

    def attach(self) -> list:
        """Registers the hooks (scorer, cut, pruned layers, q/k capture) and returns their handles."""
        handles = []
        k = self.options.layer
        scorer = self._layers[k - 1]
        handles.append(scorer.self_attn.register_forward_hook(self._score_hook, with_kwargs=True))
        handles.append(scorer.register_forward_hook(self._cut_hook))
        for layer in self._layers[k:]:
            handles.append(layer.register_forward_pre_hook(self._pruned_layer_pre, with_kwargs=True))
        if not self.eager:  # the layer returns no probabilities: recompute them from its q/k
            attn = scorer.self_attn
            for name in ("q_proj", "k_proj"):
                handles.append(getattr(attn, name).register_forward_hook(self._capture(name)))
        return handles

    def _capture(self, name):
        def hook(_module, _args, output):
            if self.state.phase is Phase.PREFILL:
                self._qk[name] = output
        return hook

    def _score_hook(self, module, args, kwargs, output):
        """On the scoring layer's attention: choose the survivors from its probabilities."""
        if self.state.phase is not Phase.PREFILL:
            return None
        prefill = self.state.prefill
        if not bool((prefill.image & prefill.valid).any()):
            return None
        with torch.no_grad():
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                weights = recompute_attention(module, self._qk["q_proj"], self._qk["k_proj"],
                                              kwargs["position_embeddings"], prefill.valid)
            attention = weights.float().mean(1)  # [B, L1, L1]
            keep = stage2_keep(attention, prefill.valid, prefill.image, self.options)
            if not torch.equal(keep, prefill.valid):
                prefill.index2, prefill.valid2 = repack(keep)
        return None

    def _cut_hook(self, module, args, output):
        """On the scoring layer's output: only the survivors go on."""
        if self.state.phase is not Phase.PREFILL or self.state.prefill.index2 is None:
            return None
        index = self.state.prefill.index2
        if isinstance(output, tuple):
            return (gather_tokens(output[0], index), *output[1:])
        return gather_tokens(output, index)

    def _pruned_layer_pre(self, module, args, kwargs):
        """Before each later layer: the survivors' RoPE tables and position ids, and their mask."""
        state = self.state
        # The mask is made once per forward, before the first pruned layer has written its cache:
        # made again later, it would count that layer's new entries twice. transformers may also
        # return None (no padding, the kernel's own causal mask), which must not read as "not yet".
        first = module is self._layers[self.options.layer]
        if state.phase is Phase.PREFILL and state.prefill.index2 is not None:
            prefill = state.prefill
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            rope = (gather_tokens(cos, prefill.index2), gather_tokens(sin, prefill.index2))
            out = dict(kwargs, position_embeddings=rope)
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = gather_tokens(kwargs["position_ids"], prefill.index2)
            if first:
                prefill.pruned_mask = pruned_layers_mask(self._lm.config, hidden, prefill.valid2.long(),
                                                         kwargs, out.get("position_ids"), self.options.layer)
            out["attention_mask"] = prefill.pruned_mask
            return args, out
        if state.phase is Phase.DECODE and state.step.pruned_mask2d is not None:
            step = state.step
            hidden = args[0] if args else kwargs["hidden_states"]
            if first:
                step.pruned_mask = pruned_layers_mask(self._lm.config, hidden, step.pruned_mask2d, kwargs,
                                                      kwargs.get("position_ids"), self.options.layer)
            return args, dict(kwargs, attention_mask=step.pruned_mask)
        return None
