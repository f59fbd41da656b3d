"""The one contract between DiversityAwareSparsity and the pruning step after it.

DAS computes one sparsity ratio per layer; the first pruning step after it in
the recipe prunes each layer at that ratio. All DAS needs of that step is
``LayerRatioPruner``. Our ``AdaptiveInputActivation`` implements it itself;
llm-compressor's ``WandaPruningModifier`` and ``SparseGPTModifier``
(``SparsityModifierBase``) are wrapped in ``SparsityListPruner``.

Those two take ``sparsity`` as one float or as a list with one value per
module their ``targets`` match. With the default ``independent`` pipeline each
modifier calibrates in turn, and a pruner reads that list only when its own
calibration starts, so the adapter can write the list when DAS's calibration
ends, and puts the float back at the end of the run (``restore``) so that the
saved ``recipe.yaml`` reads as written.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import (
    PRUNABLE_LAYER_TYPES,
    SparsityModifierBase,
)

__all__ = [
    "LayerRatioPruner",
    "SparsityListPruner",
    "as_layer_ratio_pruner",
    "check_pruner",
    "following_pruner",
    "pruned_by_targets",
]

# Wanda prunes int(columns * ratio) weights per row; a ratio of exactly k/columns
# can land a hair under k in floating point and prune k - 1. This nudge is far
# below one weight for any layer width (columns * 1e-7 < 1) and far above the
# rounding error.
_TRUNCATION_GUARD = 1e-7


@runtime_checkable
class LayerRatioPruner(Protocol):
    """A pruning step that prunes each layer at the ratio DiversityAwareSparsity gives it."""

    @property
    def pruning_step(self) -> Modifier:
        """The recipe step that prunes (for messages, and to find it among the recipe's steps)."""

    @property
    def sparsity(self) -> float | list[float] | None:
        """The global ratio as the recipe gives it (a list is refused: DAS sets the ratios)."""

    @property
    def mask_structure(self) -> str:
        """``"0:0"`` (unstructured) or ``"N:M"``, under which per-layer ratios cannot apply."""

    @property
    def sparsity_profile(self) -> str | None:
        """Another per-layer allocation of the pruner's own (refused alongside DAS)."""

    @property
    def scope(self) -> str | None:
        """The pruner's own ``scope`` (it must equal DAS's), None if it has none."""

    @property
    def data_parallel(self) -> bool:
        """Whether it prunes from every rank's statistics under torchrun."""

    def pruned_modules(self, model: torch.nn.Module) -> list[str]:
        """The names of the modules it will prune, in the model's order."""

    def set_layer_ratios(self, model: torch.nn.Module, allocated: dict[str, float],
                         assigned: dict[str, float]) -> dict[str, float]:
        """Take the ratios; return the one each pruned module was given.

        ``allocated`` are DAS's ratios, ``assigned`` the same snapped to whole weights per row.
        """

    def restore(self) -> None:
        """At the end of the run: put back what ``set_layer_ratios`` changed in the recipe's fields."""


def pruned_by_targets(model: torch.nn.Module, targets, ignore) -> dict[str, str]:
    """Module name -> the target-layer name, for every module ``SparsityModifierBase`` prunes.

    Mirrors ``SparsityModifierBase.on_calibration_start``, including its way of
    naming a module for the ignore check (``f"{layer}.{sub}"``, so a Linear
    target is checked as ``"...q_proj."``).
    """
    pruned = {}
    for layer_name, layer in match_named_modules(model, targets):
        for sub, module in match_named_modules(layer, PRUNABLE_LAYER_TYPES):
            if match_targets(f"{layer_name}.{sub}", module, ignore):
                continue
            if isinstance(module, torch.nn.Embedding):
                continue
            full = f"{layer_name}.{sub}" if sub else layer_name
            pruned[full] = layer_name
    return pruned


class SparsityListPruner:
    """llm-compressor's Wanda or SparseGPT as a ``LayerRatioPruner``: ratios go into its ``sparsity`` list.

    The list has one value per target layer (``match_named_modules(model,
    targets)``, without ``ignore``); a target holding several pruned modules (a
    whole decoder block) gives them one ratio, their common ``allocated`` one.
    """

    # llm-compressor 0.14's Wanda and SparseGPT keep each rank's statistics to
    # themselves under torchrun.
    data_parallel = False
    scope = None  # it prunes exactly what its targets/ignore match

    def __init__(self, step: SparsityModifierBase):
        self._step = step
        self._written = step.sparsity  # as the recipe wrote it, for restore

    @property
    def pruning_step(self) -> SparsityModifierBase:
        return self._step

    @property
    def sparsity(self) -> float | list[float] | None:
        return self._step.sparsity

    @property
    def mask_structure(self) -> str:
        return self._step.mask_structure

    @property
    def sparsity_profile(self) -> str | None:
        return self._step.sparsity_profile

    def pruned_modules(self, model: torch.nn.Module) -> list[str]:
        return list(pruned_by_targets(model, self._step.targets, self._step.ignore))

    def set_layer_ratios(self, model: torch.nn.Module, allocated: dict[str, float],
                         assigned: dict[str, float]) -> dict[str, float]:
        step = self._step
        by_target: dict[str, list[str]] = {}
        for module_name, target_name in pruned_by_targets(model, step.targets, step.ignore).items():
            by_target.setdefault(target_name, []).append(module_name)

        given: dict[str, float] = {}
        values = []
        for target_name, _layer in match_named_modules(model, step.targets):
            modules = by_target.get(target_name, [])
            if not modules:
                # Nothing pruned here, so the pruner never reads it: its own value, or 0 when the
                # recipe left the target to DAS.
                values.append(float(step.sparsity) if step.sparsity is not None else 0.0)
                continue
            if len(modules) == 1:
                ratio = assigned[modules[0]]
                values.append(min(ratio + _TRUNCATION_GUARD, 1.0) if ratio > 0 else 0.0)
            else:
                ratios = {allocated[m] for m in modules}
                if len(ratios) > 1:
                    raise ValueError(
                        f"{type(step).__name__} target {target_name!r} holds {len(modules)} "
                        "modules that DiversityAwareSparsity gave different ratios; set the "
                        'pruner\'s targets to ["Linear"] for per-layer ratios, or DAS '
                        "granularity: block for one ratio per decoder block"
                    )
                ratio = ratios.pop()
                values.append(ratio)
            for m in modules:
                given[m] = ratio
        step.sparsity = values
        return given

    def restore(self) -> None:
        # The saved recipe.yaml should read as written (one global sparsity, or
        # none when DAS gave the target), so that re-running it reproduces this run.
        self._step.sparsity = self._written


def as_layer_ratio_pruner(step: Modifier) -> LayerRatioPruner | None:
    """``step`` as a ``LayerRatioPruner``: itself, wrapped, or None if it cannot take per-layer ratios."""
    if isinstance(step, LayerRatioPruner):
        return step
    if isinstance(step, SparsityModifierBase):
        return SparsityListPruner(step)
    return None


def following_pruner(modifiers: list[Modifier], das: Modifier) -> LayerRatioPruner | None:
    """The first pruning step after ``das`` in the recipe, if any."""
    after = modifiers[modifiers.index(das) + 1 :] if das in modifiers else []
    return next((p for p in map(as_layer_ratio_pruner, after) if p is not None), None)


def check_pruner(pruner: LayerRatioPruner) -> None:
    """Refuse pruner settings under which per-layer ratios cannot apply."""
    name = type(pruner.pruning_step).__name__
    structure = pruner.mask_structure
    if structure not in (None, "0:0"):
        raise ValueError(
            f"{name} uses mask_structure {structure!r}: an N:M pattern prunes a fixed "
            "share of every row, so DiversityAwareSparsity's per-layer ratios cannot "
            "apply. Remove DiversityAwareSparsity from this recipe, or set "
            'mask_structure: "0:0" for unstructured per-layer sparsity.'
        )
    if isinstance(pruner.sparsity, (list, dict)):
        raise ValueError(
            f"{name} was given a list of sparsities; DiversityAwareSparsity sets the "
            "per-layer ratios itself. Give the pruner one sparsity value."
        )
    if pruner.sparsity_profile:
        raise ValueError(
            f"{name} has sparsity_profile={pruner.sparsity_profile!r}, another per-layer "
            "allocation; DiversityAwareSparsity already sets per-layer ratios. Remove "
            "one of the two."
        )
