"""Calibration data already processed into model inputs, one sample per row."""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["collate_rows", "load_calibration_dataset"]


def collate_rows(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate rows along the batch dimension the processor already gave them.

    Processor outputs keep a batch dimension (``input_ids`` ``[1, L]``);
    llm-compressor's default collator would add a second one and tracing fails.
    Rows in one batch need equal lengths (use batch_size=1, or pad them).
    """
    return {k: torch.cat([torch.as_tensor(row[k]) for row in batch], dim=0) for k in batch[0]}


def load_calibration_dataset(path: str | os.PathLike):
    """A dataset saved with ``Dataset.save_to_disk`` whose rows are model inputs."""
    from datasets import load_from_disk

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"calibration set {path} not found: give a folder written by "
            "datasets.Dataset.save_to_disk with processor outputs (input_ids, "
            "attention_mask, pixel_values, ...) as columns"
        )
    ds = load_from_disk(os.fspath(path))
    if "input_ids" not in ds.column_names:
        raise ValueError(
            f"calibration set {path} has columns {ds.column_names}, but no input_ids: "
            "save the processor's outputs, not raw text/images"
        )
    ds.set_format("torch")
    return ds
