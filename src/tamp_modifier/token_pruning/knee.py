"""Where a long-tailed score curve bends: how many of the top-scoring tokens to keep.

Every rule looks at the scores sorted in descending order and returns a count
``k``: keep the ``k`` highest-scoring tokens (the head), drop the tail.

- ``kneedle`` (the default): normalise the sorted curve to [0, 1] on both axes
  and take the point furthest below the chord from the first to the last point;
  that point is the first of the tail, so ``k`` is its index. A curve with no
  point below the chord (no long tail) keeps everything.
- ``largest_drop``: cut after the largest single drop between neighbours.
- ``iqr``: keep the outliers, the scores above ``Q3 + 1.5 * IQR``.

``keep_mask`` applies a rule to scores in their original order, clamps the
count to ``[min_tokens, max_tokens]`` and returns a boolean mask, so the kept
tokens keep their order.

    >>> knee_count(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    1
    >>> keep_mask(torch.tensor([0.0, 0.9, 0.1, 1.0]), "kneedle").tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import torch

__all__ = ["KNEE_RULES", "clamp_count", "keep_mask", "knee_count"]

KNEE_RULES = ("kneedle", "largest_drop", "iqr")


def _kneedle(desc: torch.Tensor) -> int:
    n = desc.numel()
    span = desc[0] - desc[-1]
    if n <= 2 or span <= 0:
        return n
    y = (desc - desc[-1]) / span  # 1 at the first point, 0 at the last
    x = torch.arange(n, dtype=desc.dtype, device=desc.device) / (n - 1)
    below = (1.0 - x) - y  # distance below the chord y = 1 - x (up to a constant factor)
    best = int(torch.argmax(below))
    return best if float(below[best]) > 0 else n


def _largest_drop(desc: torch.Tensor) -> int:
    n = desc.numel()
    if n <= 1:
        return n
    drops = desc[:-1] - desc[1:]
    if float(drops.max()) <= 0:
        return n
    return int(torch.argmax(drops)) + 1


def _iqr(desc: torch.Tensor) -> int:
    if desc.numel() == 0:
        return 0
    q1, q3 = torch.quantile(desc, torch.tensor([0.25, 0.75], dtype=desc.dtype, device=desc.device))
    return int((desc > q3 + 1.5 * (q3 - q1)).sum())


def knee_count(scores: torch.Tensor, rule: str = "kneedle") -> int:
    """How many of the highest ``scores`` (1-D) form the head before the knee, by ``rule``."""
    if rule not in KNEE_RULES:
        raise ValueError(f"unknown knee rule {rule!r}; use one of {', '.join(KNEE_RULES)}")
    if scores.dim() != 1:
        raise ValueError(f"knee rules take a 1-D score vector, got shape {tuple(scores.shape)}")
    desc = torch.sort(scores.detach().double(), descending=True).values
    return {"kneedle": _kneedle, "largest_drop": _largest_drop, "iqr": _iqr}[rule](desc)


def clamp_count(count: int, n: int, min_tokens: int = 1, max_tokens: int | None = None) -> int:
    """``count`` clamped to ``[min_tokens, max_tokens]`` and then to ``[0, n]``."""
    count = max(count, min_tokens)
    if max_tokens is not None:
        count = min(count, max_tokens)
    return max(0, min(count, n))


def keep_mask(
    scores: torch.Tensor,
    rule: str = "kneedle",
    min_tokens: int = 1,
    max_tokens: int | None = None,
    keep_ratio: float | None = None,
) -> torch.Tensor:
    """Boolean mask over ``scores`` (original order) of the tokens to keep.

    The count comes from ``rule`` or, when ``keep_ratio`` is given, is the fixed
    share ``round(keep_ratio * n)`` (FastV-style); either way it is clamped to
    ``[min_tokens, max_tokens]``. Ties at the cut are broken towards the earlier token.
    """
    n = scores.numel()
    if keep_ratio is not None:
        count = int(round(keep_ratio * n))
    else:
        count = knee_count(scores, rule)
    count = clamp_count(count, n, min_tokens, max_tokens)
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if count:
        # stable sort: equal scores keep their original order, so the earlier one wins a tie
        order = torch.sort(scores.detach().double(), descending=True, stable=True).indices
        mask[order[:count]] = True
    return mask
