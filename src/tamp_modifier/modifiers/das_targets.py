"""Which Linears DiversityAwareSparsity scores, agreed with the pruner after it.

DAS scores exactly the modules the pruner after it will prune, so that every
pruned module gets a ratio and every ratio is used. Its own ``targets`` /
``ignore`` are then only a cross-check; without a pruner (a profiling run) they
say what to score. ``scope`` confines both to the text decoder's layers
(``tamp_modifier.modifiers.scope``). Every check here raises before calibration.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.utils import match_named_modules
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from tamp_modifier.modifiers.distributed import is_distributed, world_size
from tamp_modifier.modifiers.ratio_handover import LayerRatioPruner
from tamp_modifier.modifiers.scope import modules_outside_decoder
from tamp_modifier.text_decoder import find_text_decoder

__all__ = [
    "adopted_sparsity",
    "check_data_parallel",
    "check_scopes_agree",
    "decoder_blocks",
    "scored_modules",
]


def _name(pruner: LayerRatioPruner) -> str:
    return type(pruner.pruning_step).__name__


def check_data_parallel(pruner: LayerRatioPruner) -> None:
    """Under torchrun, refuse a pruner that would prune each rank on its own share of the samples."""
    # llm-compressor 0.14's Wanda and SparseGPT keep each rank's statistics to
    # themselves: every rank would write its own masks into the weights the ranks share.
    if is_distributed() and not pruner.data_parallel:
        raise ValueError(
            f"{_name(pruner)} is not data-parallel in llm-compressor 0.14 "
            f"(this run has {world_size()} ranks): each rank would prune with its own "
            "share of the calibration samples. Under torchrun use AdaptiveInputActivation "
            "as the pruner (token_selection: all is Wanda's rule), or run in one process."
        )


def adopted_sparsity(sparsity: float | None, pruner: LayerRatioPruner) -> float:
    """The one global target of DAS and the pruner: either's, equal if both give one."""
    theirs = float(pruner.sparsity) if pruner.sparsity is not None else None
    if sparsity is None:
        if theirs is None:
            raise ValueError("neither DiversityAwareSparsity nor the pruner after it has a sparsity")
        return theirs
    if theirs is not None and not math.isclose(sparsity, theirs):
        raise ValueError(
            f"DiversityAwareSparsity has sparsity {sparsity} but "
            f"{_name(pruner)} has {theirs}: give one target "
            "(leave DiversityAwareSparsity's sparsity out to use the pruner's)"
        )
    return sparsity


def check_scopes_agree(scope: str, pruner: LayerRatioPruner) -> None:
    theirs = pruner.scope
    if theirs is not None and theirs != scope:
        raise ValueError(
            f"DiversityAwareSparsity has scope {scope!r} but {_name(pruner)} has "
            f"{theirs!r}: they must score and prune the same layers; give both the same scope"
        )


def _within_scope(model: torch.nn.Module, modules: dict[str, torch.nn.Module] | None, scope: str,
                  ) -> dict[str, torch.nn.Module]:
    """The modules DAS may score: inside the text decoder's layers (``scope``).

    ``None`` stands for every Linear (a profiling run without patterns).
    """
    if modules is None:
        modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if scope == "text_decoder":
        decoder = find_text_decoder(model)
        return {n: m for n, m in modules.items() if decoder.contains(n)}
    outside = modules_outside_decoder(model, modules)
    if outside:
        raise ValueError(
            f"DiversityAwareSparsity would score {len(outside)} Linears outside every text-decoder "
            f"layer ({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}): it labels the "
            "decoder's tokens by modality, which a tower's inputs do not have. Use scope: text_decoder "
            "(the default), or add them to the pruner's ignore list"
        )
    return modules


def scored_modules(model: torch.nn.Module, targets: list[str] | None, ignore: list[str] | None,
                   scope: str, pruner: LayerRatioPruner | None) -> dict[str, torch.nn.Module]:
    """The Linears DAS scores, by name in the model's order: the pruner's, else its own patterns'."""
    own = None
    if targets is not None or ignore is not None:
        targets = targets if targets is not None else ["Linear"]
        own = {
            n: m
            for n, m in match_named_modules(model, targets, ignore or [])
            if isinstance(m, torch.nn.Linear)
        }
        if not own:
            raise ValueError(
                f"DiversityAwareSparsity targets {targets} with ignore {ignore} "
                "match no Linear module; check the patterns (`re:` patterns match "
                "from the start of the name: write `re:.*q_proj`)"
            )
    if own is not None or pruner is None:
        own = _within_scope(model, own, scope)
    if pruner is None:
        return own
    pruned = pruner.pruned_modules(model)
    if not pruned:
        raise ValueError(
            f"{_name(pruner)}'s targets/ignore match nothing to prune; "
            'check its patterns (targets: ["Linear"] as a list)'
        )
    modules = _within_scope(model, {n: model.get_submodule(n) for n in pruned}, scope)
    not_linear = [n for n, m in modules.items() if not isinstance(m, torch.nn.Linear)]
    if not_linear:
        raise ValueError(
            f"DiversityAwareSparsity scores Linear layers only; the pruner also prunes "
            f"{not_linear[:3]}: add them to its ignore list"
        )
    if own is not None and set(own) != set(modules):
        extra, missing = sorted(set(own) - set(modules)), sorted(set(modules) - set(own))
        raise ValueError(
            "DiversityAwareSparsity and the pruner after it must cover the same "
            f"layers. Only DAS: {extra[:3]}; only the pruner: {missing[:3]}. Leave "
            "DAS's targets/ignore out to use the pruner's."
        )
    return modules


def decoder_blocks(model: torch.nn.Module, names, sequential_targets) -> dict[str, str]:
    """Each module's decoder block: the sequential target that contains it."""
    targets = infer_sequential_targets(model, sequential_targets)
    block_names = [n for n, _ in match_named_modules(model, targets)]
    blocks = {}
    for name in names:
        owners = [b for b in block_names if name.startswith(b + ".")]
        blocks[name] = max(owners, key=len) if owners else name.rpartition(".")[0]
    return blocks
