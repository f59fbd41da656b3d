"""Did the recipe steps after pruning keep the sparsity pattern?

A recipe that prunes and then quantizes relies on the quantizer leaving the
zeros alone. Round-to-nearest schemes (``QuantizationModifier``: FP8, W8A8,
W4A16) do, since 0 quantizes to 0. GPTQ in llm-compressor 0.14 does not: it
spreads each column's rounding error over the later columns, pruned weights
included. The check runs twice: a warning at initialization, before any
calibration, for steps known to break the pattern, and a measurement at the end
of the run (``on_finalize``, after every step's pipeline) that names the steps
that ran after the pruner and says how much of the pattern survived.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from compressed_tensors.utils import align_module_device
from llmcompressor.core import active_session
from llmcompressor.modifiers import Modifier
from loguru import logger

from tamp_modifier.pruning.sparsity_pattern import compare_patterns, describe_pattern, layer_pattern
from tamp_modifier.report.sections import attach_section, attached_report, expected_pattern

__all__ = ["PatternCheckingStep", "check_pattern_kept", "warn_pattern_breaking_steps"]

# Steps measured to refill pruned weights, and what was seen.
_BREAKS_PATTERN = {
    "GPTQModifier": "GPTQ updates pruned weights while it quantizes (llm-compressor 0.14 measured "
                    "47.9% zeros left of 50%, 92% of 4-groups still 2:4)",
}


@runtime_checkable
class PatternCheckingStep(Protocol):
    """One of our modifiers (DAS, AMIA): each runs the check, but only the last in the recipe checks."""

    @property
    def checks_sparsity_pattern(self) -> bool:
        """True: it calls ``warn_pattern_breaking_steps`` and ``check_pattern_kept``."""

    @property
    def pruning_step(self) -> Modifier | None:
        """The recipe step whose pattern it answers for: itself for a pruner, the pruner it
        handed its ratios to for DAS, None when nothing is pruned."""


def _recipe_modifiers() -> list[Modifier]:
    return list(active_session().lifecycle.recipe.modifiers or [])


def _ours(modifiers: list[Modifier]) -> list[PatternCheckingStep]:
    return [m for m in modifiers if isinstance(m, PatternCheckingStep) and m.checks_sparsity_pattern]


def _pruning_step(modifiers: list[Modifier]) -> Modifier | None:
    """The step whose pattern we check: the first of ours that prunes itself, else the first's pruner."""
    ours = _ours(modifiers)
    pruners = [m for m in ours if m.pruning_step is m]
    if pruners:
        return pruners[0]
    return ours[0].pruning_step if ours else None


def _steps_after(modifiers: list[Modifier], step: Modifier) -> list[str]:
    index = next(i for i, m in enumerate(modifiers) if m is step)
    return [type(m).__name__ for m in modifiers[index + 1 :]]


def warn_pattern_breaking_steps(owner: Modifier) -> None:
    """At initialization: warn (once per run) about later steps known to break the pattern."""
    modifiers = _recipe_modifiers()
    if not _is_last_of_ours(owner, modifiers):
        return
    step = _pruning_step(modifiers)
    if step is None:
        return
    for name in _steps_after(modifiers, step):
        if name in _BREAKS_PATTERN:
            logger.warning(
                f"{name} runs after {type(step).__name__} in this recipe and will not keep the "
                f"sparsity pattern: {_BREAKS_PATTERN[name]}. To keep it, quantize with "
                "QuantizationModifier (round-to-nearest, e.g. scheme FP8_DYNAMIC, W8A8 or W4A16) "
                "instead; the end of the run reports how much of the pattern survived."
            )


def _is_last_of_ours(owner: Modifier, modifiers: list[Modifier]) -> bool:
    ours = _ours(modifiers)
    return bool(ours) and ours[-1] is owner


def check_pattern_kept(owner: Modifier, model: torch.nn.Module) -> dict | None:
    """At the end of the run: measure the pattern in memory, warn if a later step broke it.

    Only the last of our modifiers in the recipe checks, so a TAMP recipe
    (DAS + AMIA) checks once. The result goes into the report's ``pattern``
    section and is returned; None when nothing was pruned.
    """
    modifiers = _recipe_modifiers()
    if not _is_last_of_ours(owner, modifiers):
        return None
    expected = expected_pattern(attached_report(model))
    step = _pruning_step(modifiers)
    if not expected or step is None:
        return None
    measured = {}
    for name, spec in expected.items():
        module = model.get_submodule(name)
        with torch.no_grad(), align_module_device(module):
            measured[name] = {**layer_pattern(module.weight, spec["mask_structure"]),
                              "num_weights": module.weight.numel()}
            spec["num_weights"] = measured[name]["num_weights"]
    pattern = compare_patterns(expected, measured)
    pruner = type(step).__name__
    later = _steps_after(modifiers, step)
    attach_section(model, "pattern", {"pruned_by": pruner, "steps_after": later, **pattern})
    survived = describe_pattern(pattern)
    if pattern["intact"]:
        logger.info(f"sparsity pattern of {pruner} kept to the end of the recipe: {survived}")
        return pattern
    if later:
        culprit = (f"the step after {pruner}, {later[0]}," if len(later) == 1
                   else f"one of the steps after {pruner} ({', '.join(later)})")
    else:
        culprit = f"{pruner} itself"
    logger.warning(
        f"{culprit} broke the sparsity pattern: {survived} (first: {pattern['broken'][0]}). Quantize with "
        "QuantizationModifier (round-to-nearest) after pruning to keep the pattern; GPTQ does not."
    )
    return pattern
