"""From per-layer importance scores to per-layer sparsity ratios.

The target is global and parameter-weighted: ``sum_L n_L p_L = p sum_L n_L``.
More important layers (higher diversity) keep more weights. Two rules:

``ecoflap``
    Every layer first keeps ``ceil(n_L (1 - p - max_delta))`` weights; the rest
    of the global keep-budget is shared out in proportion to the scores, as
    weight counts, with layers that fill up capped and their surplus shared
    again. Small layers end up nearly dense (the budget is in counts).
``proportional``
    Density ``1 - p_L`` proportional to the score, scaled so the target holds,
    every ``p_L`` clipped to ``[p - max_delta, p + max_delta]`` (and ``>= 0``),
    rescaled until both hold.

Scores do not depend on ``p``: score once, allocate for as many targets as you
like (see ``tamp_modifier.reallocate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tamp_modifier.validation import at_least, in_range, one_of

__all__ = [
    "ALLOCATIONS",
    "GRANULARITIES",
    "allocate_by_granularity",
    "allocate_sparsity",     "check_sparsity_bounds",
    "snap_to_rows",
]

ALLOCATIONS = ("ecoflap", "proportional")
GRANULARITIES = ("layer", "block")


def check_sparsity_bounds(sparsity: float, max_delta: float) -> None:
    """Raise a ValueError naming the fix if ``sparsity``/``max_delta`` cannot work."""
    in_range("sparsity", sparsity, 0, 1, why="it is the fraction of weights removed, e.g. 0.5 for half")
    at_least("max_delta", max_delta, 0)
    if sparsity + max_delta >= 1.0:
        raise ValueError(
            f"sparsity + max_delta = {sparsity + max_delta:g} would let a layer lose "
            f"every weight; lower max_delta below {1.0 - sparsity:g}"
        )


def _share_proportionally(
    budget: float, weights: dict[str, float], capacity: dict[str, float]
) -> dict[str, float]:
    """Split ``budget`` in proportion to ``weights``, never past ``capacity``.

    Capped entries take their capacity; what they could not take is shared
    again among the rest (water-filling). Entries with zero weight get a share
    only once every weighted entry is full.
    """
    share = {name: 0.0 for name in weights}
    open_ = {name for name in weights if capacity[name] > 0}
    while budget > 1e-9 and open_:
        total = sum(weights[n] for n in open_)
        if total <= 0:  # only zero-weight entries left: share by capacity
            w = {n: capacity[n] - share[n] for n in open_}
            total = sum(w.values())
        else:
            w = {n: weights[n] for n in open_}
        full = {n for n in open_ if share[n] + budget * w[n] / total >= capacity[n]}
        if not full:
            for n in open_:
                share[n] += budget * w[n] / total
            break
        for n in full:
            budget -= capacity[n] - share[n]
            share[n] = capacity[n]
        open_ -= full
    return share


def _largest_remainder(values: dict[str, float], total: int, caps: dict[str, int]) -> dict[str, int]:
    """Round ``values`` to integers summing to ``total``, each within its cap."""
    floors = {n: min(math.floor(v + 1e-9), caps[n]) for n, v in values.items()}
    missing = total - sum(floors.values())
    order = sorted(values, key=lambda n: values[n] - floors[n], reverse=True)
    for n in order:
        if missing <= 0:
            break
        if floors[n] < caps[n]:
            floors[n] += 1
            missing -= 1
    return floors


def _ecoflap(scores, sizes, sparsity, max_delta) -> dict[str, float]:
    p_max = sparsity + max_delta
    base = {n: min(sizes[n], math.ceil(sizes[n] * (1 - p_max) - 1e-9)) for n in sizes}
    total_keep = round(sum(sizes.values()) * (1 - sparsity))
    budget = total_keep - sum(base.values())
    room = {n: float(sizes[n] - base[n]) for n in sizes}
    extra = _share_proportionally(float(budget), dict(scores), room)
    extra = _largest_remainder(extra, budget, {n: sizes[n] - base[n] for n in sizes})
    return {n: 1.0 - (base[n] + extra[n]) / sizes[n] for n in sizes}


def _proportional(scores, sizes, sparsity, max_delta) -> dict[str, float]:
    lo = 1.0 - (sparsity + max_delta)  # least density a layer may keep
    hi = 1.0 - max(sparsity - max_delta, 0.0)  # most density a layer may keep
    if len(set(scores.values())) == 1:
        return {n: sparsity for n in sizes}
    target = (1 - sparsity) * sum(sizes.values())

    def kept(scale: float) -> float:
        return sum(sizes[n] * min(max(scores[n] * scale, lo), hi) for n in sizes)

    # kept() is continuous and non-decreasing in the scale: bisect to float precision.
    top = 1.0
    while kept(top) < target:
        top *= 2
        if top > 1e30:
            raise ValueError(
                f"the target sparsity {sparsity:g} cannot be met within +/-{max_delta:g} "
                "of it with these scores (layers scored 0 stay at the lowest density); "
                "raise max_delta or use allocation: ecoflap"
            )
    bottom = 0.0
    for _ in range(200):
        mid = (bottom + top) / 2
        bottom, top = (mid, top) if kept(mid) < target else (bottom, mid)
    return {n: 1.0 - min(max(scores[n] * top, lo), hi) for n in sizes}


def allocate_sparsity(
    scores: Mapping[str, float],
    sizes: Mapping[str, int],
    sparsity: float,
    allocation: str = "ecoflap",
    max_delta: float = 0.1,
) -> dict[str, float]:
    """Per-layer sparsity from importance scores, meeting a global target.

    :param scores: importance per layer name (diversity; higher keeps more)
    :param sizes: number of prunable weights per layer name
    :param sparsity: global, parameter-weighted target in ``[0, 1)``
    :param allocation: ``"ecoflap"`` (default) or ``"proportional"``
    :param max_delta: a layer's sparsity stays at most ``sparsity + max_delta``
        (and, for ``proportional``, at least ``sparsity - max_delta``)
    :return: sparsity per layer name, same keys as ``scores``

    Example::

        >>> allocate_sparsity({"a": 0.9, "b": 0.3}, {"a": 100, "b": 100}, 0.5,
        ...                   allocation="proportional")
        {'a': 0.4, 'b': 0.6}
    """
    check_sparsity_bounds(sparsity, max_delta)
    one_of("allocation", allocation, ALLOCATIONS)
    if not scores:
        raise ValueError("allocate_sparsity needs at least one layer score")
    if set(scores) != set(sizes):
        missing = sorted(set(scores) ^ set(sizes))[:5]
        raise ValueError(f"scores and sizes must name the same layers; differ at {missing}")
    bad = {n: s for n, s in scores.items() if not (math.isfinite(s) and s >= 0)}
    if bad:
        raise ValueError(f"scores must be finite and >= 0; got {dict(list(bad.items())[:5])}")
    if any(int(v) <= 0 for v in sizes.values()):
        raise ValueError("every layer size must be a positive number of weights")
    rule = _ecoflap if allocation == "ecoflap" else _proportional
    ratios = rule(dict(scores), {n: int(v) for n, v in sizes.items()}, float(sparsity), float(max_delta))
    return {n: ratios[n] for n in scores}


def allocate_by_granularity(
    scores: dict[str, float],
    sizes: dict[str, int],
    blocks: dict[str, str],
    sparsity: float,
    allocation: str,
    max_delta: float,
    granularity: str,
) -> dict[str, float]:
    """Allocate per layer, or per decoder block (block-wise DAS) then per layer.

    Block-wise: a block's score is the mean of its layers' scores, its size the
    sum of theirs; each layer takes its block's ratio.
    """
    one_of("granularity", granularity, GRANULARITIES)
    if granularity == "layer":
        return allocate_sparsity(scores, sizes, sparsity, allocation, max_delta)
    members: dict[str, list[str]] = {}
    for name in scores:
        members.setdefault(blocks[name], []).append(name)
    block_scores = {b: sum(scores[n] for n in ns) / len(ns) for b, ns in members.items()}
    block_sizes = {b: sum(sizes[n] for n in ns) for b, ns in members.items()}
    ratios = allocate_sparsity(block_scores, block_sizes, sparsity, allocation, max_delta)
    return {n: ratios[blocks[n]] for n in scores}


def snap_to_rows(ratios: Mapping[str, float], columns: Mapping[str, int]) -> dict[str, float]:
    """Round each ratio to a whole number of weights per output row.

    Row-wise pruners (Wanda, AMIA) remove the same count from every row, so a
    ratio ``k / columns`` is exactly what they realize.
    """
    return {n: round(r * columns[n]) / columns[n] for n, r in ratios.items()}
