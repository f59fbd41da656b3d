"""A saved ``tamp_report.json``: read it back, and new per-layer ratios from its DAS scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tamp_modifier.pruning.allocation import allocate_by_granularity

__all__ = ["REPORT_FILE_NAME", "load_report", "reallocate"]

REPORT_FILE_NAME = "tamp_report.json"


def load_report(path: str | os.PathLike) -> dict:
    """Read ``tamp_report.json`` from a file or a saved model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no TAMP report at {path}: run DiversityAwareSparsity and save the model "
            f"(it writes {REPORT_FILE_NAME} next to the checkpoint)"
        )
    with open(path) as f:
        return json.load(f)


def reallocate(
    report: dict | str | os.PathLike,
    sparsity: float,
    allocation: str | None = None,
    max_delta: float | None = None,
    granularity: str | None = None,
) -> dict[str, float]:
    """Per-layer sparsity for a new target from saved DAS scores, no calibration.

    Arguments left as None take the values the report was made with.

    Example::

        >>> ratios = reallocate("pruned-model/", sparsity=0.6)
    """
    if not isinstance(report, dict):
        report = load_report(report)
    das = report.get("das")
    if not das or not das.get("layers"):
        raise ValueError("the report has no DAS section with layer scores to reallocate")
    allocation = allocation or das["allocation"]
    max_delta = das["max_delta"] if max_delta is None else max_delta
    granularity = granularity or das["granularity"]
    layers = das["layers"]
    return allocate_by_granularity(
        scores={n: v["score"] for n, v in layers.items()},
        sizes={n: v["num_weights"] for n, v in layers.items()},
        blocks={n: v["block"] for n, v in layers.items()},
        sparsity=sparsity,
        allocation=allocation,
        max_delta=max_delta,
        granularity=granularity,
    )
