"""Handing per-layer ratios from DiversityAwareSparsity to the pruner after it.

llm-compressor's ``WandaPruningModifier`` and ``SparseGPTModifier`` take
``sparsity`` as one float or as a list with one value per module their
``targets`` match (``SparsityModifierBase``). With the default ``independent``
pipeline each modifier calibrates in turn, and a pruner reads that list only
when its own calibration starts, so DAS can fill it in when DAS's calibration
ends. Our own pruning modifiers take a dict by module name instead
(``set_layer_sparsity``).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import (
    PRUNABLE_LAYER_TYPES,
    SparsityModifierBase,
)

__all__ = ["following_pruner", "check_pruner", "modules_pruned_by", "hand_over"]

# Wanda prunes int(columns * ratio) weights per row; a ratio of exactly k/columns
# can land a hair under k in floating point and prune k - 1. This nudge is far
# below one weight for any layer width (columns * 1e-7 < 1) and far above the
# rounding error.
_TRUNCATION_GUARD = 1e-7


def _accepts_layer_sparsity(modifier: Modifier) -> bool:
    return isinstance(modifier, SparsityModifierBase) or hasattr(modifier, "set_layer_sparsity")


def following_pruner(modifiers: list[Modifier], das: Modifier) -> Modifier | None:
    """The first pruning modifier after ``das`` in the recipe, if any."""
    after = modifiers[modifiers.index(das) + 1 :] if das in modifiers else []
    return next((m for m in after if _accepts_layer_sparsity(m)), None)


def check_pruner(pruner: Modifier) -> None:
    """Refuse pruner settings under which per-layer ratios cannot apply."""
    name = type(pruner).__name__
    structure = getattr(pruner, "mask_structure", "0:0")
    if structure not in (None, "0:0"):
        raise ValueError(
            f"{name} uses mask_structure {structure!r}: an N:M pattern prunes a fixed "
            "share of every row, so DiversityAwareSparsity's per-layer ratios cannot "
            "apply. Remove DiversityAwareSparsity from this recipe, or set "
            'mask_structure: "0:0" for unstructured per-layer sparsity.'
        )
    if isinstance(getattr(pruner, "sparsity", None), (list, dict)):
        raise ValueError(
            f"{name} was given a list of sparsities; DiversityAwareSparsity sets the "
            "per-layer ratios itself. Give the pruner one sparsity value."
        )
    if getattr(pruner, "sparsity_profile", None):
        raise ValueError(
            f"{name} has sparsity_profile={pruner.sparsity_profile!r}, another per-layer "
            "allocation; DiversityAwareSparsity already sets per-layer ratios. Remove "
            "one of the two."
        )


def modules_pruned_by(pruner: Modifier, model: torch.nn.Module) -> dict[str, str]:
    """Module name -> the pruner's target-layer name, for every module it prunes.

    Mirrors ``SparsityModifierBase.on_calibration_start``, including its way of
    naming a module for the ignore check (``f"{layer}.{sub}"``, so a Linear
    target is checked as ``"...q_proj."``).
    """
    if hasattr(pruner, "pruned_module_names"):
        names = pruner.pruned_module_names(model)
        return {n: n for n in names}
    pruned = {}
    for layer_name, layer in match_named_modules(model, pruner.targets):
        for sub, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
            if match_targets(f"{layer_name}.{sub}", module, pruner.ignore):
                continue
            if isinstance(module, torch.nn.Embedding):
                continue
            full = f"{layer_name}.{sub}" if sub else layer_name
            pruned[full] = layer_name
    return pruned


def hand_over(
    pruner: Modifier,
    model: torch.nn.Module,
    allocated: dict[str, float],
    assigned: dict[str, float],
) -> dict[str, float]:
    """Give the pruner its per-layer ratios; return what each module was given.

    ``assigned`` are the row-snapped ratios for module-level targets; a pruner
    target holding several modules (a whole decoder block) must give them one
    ratio, so it takes their common ``allocated`` ratio.
    """
    if hasattr(pruner, "set_layer_sparsity"):
        pruner.set_layer_sparsity(dict(assigned))
        return dict(assigned)

    pruned = modules_pruned_by(pruner, model)
    by_target: dict[str, list[str]] = {}
    for module_name, target_name in pruned.items():
        by_target.setdefault(target_name, []).append(module_name)

    given: dict[str, float] = {}
    values = []
    for target_name, _layer in match_named_modules(model, pruner.targets):
        modules = by_target.get(target_name, [])
        if not modules:
            values.append(float(pruner.sparsity))  # nothing pruned here: unused
            continue
        if len(modules) == 1:
            ratio = assigned[modules[0]]
            values.append(min(ratio + _TRUNCATION_GUARD, 1.0) if ratio > 0 else 0.0)
        else:
            ratios = {allocated[m] for m in modules}
            if len(ratios) > 1:
                raise ValueError(
                    f"{type(pruner).__name__} target {target_name!r} holds {len(modules)} "
                    "modules that DiversityAwareSparsity gave different ratios; set the "
                    'pruner\'s targets to ["Linear"] for per-layer ratios, or DAS '
                    "granularity: block for one ratio per decoder block"
                )
            ratio = ratios.pop()
            values.append(ratio)
        for m in modules:
            given[m] = ratio
    pruner.sparsity = values
    return given
