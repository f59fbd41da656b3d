"""Wanda's pruning rule, given each input channel's activation norm.

A weight's score is ``|W_rk| * ||X_k||``; the lowest-scoring weights go. AMIA
only changes which tokens ``||X_k||`` is measured over.
"""

from __future__ import annotations

import torch

__all__ = ["parse_mask_structure", "prune_mask"]


def parse_mask_structure(structure: str) -> tuple[int, int]:
    """``"N:M"`` -> ``(N, M)``; ``"0:0"`` is unstructured. Errors name the fix."""
    try:
        n, m = (int(x) for x in str(structure).split(":"))
    except ValueError:
        n = m = -1
    if (n, m) != (0, 0) and not (0 < n < m):
        raise ValueError(
            f"mask_structure must be 'N:M' with 0 < N < M (e.g. '2:4': 2 of every 4 "
            f"consecutive weights pruned) or '0:0' for unstructured; got {structure!r}"
        )
    return n, m


def prune_mask(
    weight: torch.Tensor, channel_norm: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> torch.Tensor:
    """Boolean mask of the weights to prune (True = set to zero).

    :param weight: ``[rows, columns]``
    :param channel_norm: ``[columns]`` activation norm per input channel
    :param sparsity: share pruned in every row (unstructured); rounded to a whole
        number of weights per row
    :param prune_n, prune_m: N:M structure, the ``prune_n`` lowest of every
        ``prune_m`` consecutive weights of a row; ``sparsity`` is then unused
    """
    score = weight.float().abs() * channel_norm.float().reshape(1, -1)
    rows, cols = score.shape
    if prune_n:
        if cols % prune_m:
            raise ValueError(f"{cols} input columns are not a multiple of M={prune_m} ({prune_n}:{prune_m})")
        groups = score.reshape(rows, cols // prune_m, prune_m)
        lowest = torch.sort(groups, dim=-1, stable=True).indices[..., :prune_n]
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
        return mask.reshape(rows, cols)
    count = round(cols * sparsity)
    lowest = torch.sort(score, dim=1, stable=True).indices[:, :count]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, lowest, True)
