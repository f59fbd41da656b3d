"""``tamp_report.json`` written beside a saved checkpoint, counted in the saved tensors.

Every pruned layer's sparsity (``realized``) and the pattern the recipe meant to
leave (section ``checkpoint``) are measured in the safetensors files just
written, dequantized where quantized: what vLLM will load, not what was in memory.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from loguru import logger

from tamp_modifier.deploy.checkpoint import saved_weights, write_text_atomically
from tamp_modifier.pruning.sparsity_pattern import (
    compare_patterns,
    describe_pattern,
    layer_pattern,
    realized_sparsity,
)
from tamp_modifier.report.saved import REPORT_FILE_NAME
from tamp_modifier.report.sections import attached_report, expected_pattern

__all__ = ["write_report"]


def _with_realized(model: torch.nn.Module, report: dict, measured: dict[str, dict]) -> dict:
    out = copy.deepcopy(report)
    for key, section in out.items():
        if key in ("pattern", "checkpoint"):
            continue
        for name, layer in section.get("layers", {}).items():
            if name in measured:
                layer["realized"] = measured[name]["sparsity"]
                continue
            try:
                layer["realized"] = realized_sparsity(model.get_submodule(name))
            except AttributeError:
                pass  # not in this model (a report loaded for another one), or no plain weight now
    return out


def _measure_saved(model: torch.nn.Module, directory, expected: dict[str, dict]) -> dict[str, dict]:
    return {name: {**layer_pattern(weight, expected[name]["mask_structure"]), "num_weights": weight.numel()}
            for name, weight in saved_weights(directory, model, list(expected))}


def write_report(
    model: torch.nn.Module, directory: str | os.PathLike, checkpoint: dict | None = None
) -> Path | None:
    """Write the model's report into ``directory`` atomically; None if it has none.

    The sparsity of every pruned layer is counted in the safetensors files in
    ``directory`` (dequantized where quantized), not in memory.
    """
    report = attached_report(model)
    if not report:
        return None
    expected = expected_pattern(report)
    measured = _measure_saved(model, directory, expected) if expected else {}
    out = _with_realized(model, report, measured)
    if expected:
        sized = {n: {**v, "num_weights": measured[n]["num_weights"]} for n, v in expected.items()}
        pattern = compare_patterns(sized, measured)
        out["checkpoint"] = {**(checkpoint or {}), "pattern": pattern}
        _log_saved_pattern(pattern, directory)
    path = Path(directory) / REPORT_FILE_NAME
    write_text_atomically(path, json.dumps(out, indent=1, sort_keys=False))
    return path


def _log_saved_pattern(pattern: dict, directory) -> None:
    if pattern["intact"]:
        logger.info(f"saved checkpoint {directory} keeps the sparsity pattern: {describe_pattern(pattern)}")
    else:
        logger.warning(
            f"saved checkpoint {directory} does NOT keep the sparsity pattern: {describe_pattern(pattern)} "
            f"(per layer in {REPORT_FILE_NAME}, section checkpoint)"
        )
