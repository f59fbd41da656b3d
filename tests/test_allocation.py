"""Allocation against independent checks of what each rule must satisfy."""

import math
import random

import pytest

from tamp_modifier import allocate_sparsity
from tamp_modifier.pruning.allocation import allocate_by_granularity, snap_to_rows


def random_layers(seed, n=12, equal_sizes=False):
    rng = random.Random(seed)
    scores = {f"l{i}": rng.uniform(0.05, 1.5) for i in range(n)}
    sizes = {f"l{i}": 4096 if equal_sizes else rng.choice([256, 1024, 4096, 16384]) for i in range(n)}
    return scores, sizes


def global_sparsity(ratios, sizes):
    return sum(ratios[n] * sizes[n] for n in sizes) / sum(sizes.values())


@pytest.mark.parametrize("allocation", ["ecoflap", "proportional"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_global_target_and_bounds(allocation, seed, target):
    scores, sizes = random_layers(seed)
    ratios = allocate_sparsity(scores, sizes, target, allocation, max_delta=0.1)
    assert abs(global_sparsity(ratios, sizes) - target) <= 0.001 * target
    upper = target + 0.1 + 1e-12
    lower = (target - 0.1 - 1e-12) if allocation == "proportional" else -1e-12
    assert all(lower <= r <= upper for r in ratios.values())


@pytest.mark.parametrize("allocation", ["ecoflap", "proportional"])
def test_equal_sized_layers_are_ordered_by_importance(allocation):
    scores, sizes = random_layers(3, n=20, equal_sizes=True)
    ratios = allocate_sparsity(scores, sizes, 0.5, allocation, 0.2)
    by_score = sorted(scores, key=scores.get)
    for less, more in zip(by_score, by_score[1:]):
        assert ratios[more] <= ratios[less] + 1e-9  # more diverse keeps more


def test_ecoflap_shares_the_budget_in_proportion_to_scores():
    # Independent characterisation of water-filling: above the floor of
    # ceil(n (1 - p - delta)) kept weights, each layer keeps min(room, lam * score)
    # for one lam, up to integer rounding.
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 0.5}
    sizes = {"a": 10_000, "b": 10_000, "c": 1_000, "d": 50_000}
    p, delta = 0.5, 0.1
    ratios = allocate_sparsity(scores, sizes, p, "ecoflap", delta)
    floor = {n: math.ceil(sizes[n] * (1 - p - delta)) for n in sizes}
    extra = {n: round((1 - ratios[n]) * sizes[n]) - floor[n] for n in sizes}
    room = {n: sizes[n] - floor[n] for n in sizes}
    assert sum(floor.values()) + sum(extra.values()) == round(sum(sizes.values()) * (1 - p))
    uncapped = [n for n in sizes if extra[n] < room[n]]
    lam = sum(extra[n] for n in uncapped) / sum(scores[n] for n in uncapped)
    for n in sizes:
        assert extra[n] == pytest.approx(min(room[n], lam * scores[n]), abs=1.0)
    assert ratios["c"] == 0.0  # the small layer fills up: the rule's known bias


def test_proportional_density_follows_scores_between_bounds():
    scores = {"a": 0.2, "b": 0.4, "c": 0.6, "d": 1.6}
    sizes = {n: 1000 for n in scores}
    ratios = allocate_sparsity(scores, sizes, 0.5, "proportional", 0.3)
    density = {n: 1 - r for n, r in ratios.items()}
    free = [n for n in scores if 0.2 + 1e-9 < density[n] < 0.8 - 1e-9]
    assert free, "expected some layers strictly inside the bounds"
    scale = density[free[0]] / scores[free[0]]
    for n in scores:
        assert density[n] == pytest.approx(min(max(scale * scores[n], 0.2), 0.8), abs=1e-9)


def test_equal_scores_give_uniform_sparsity():
    sizes = {"a": 100, "b": 300, "c": 700}
    scores = {n: 0.7 for n in sizes}
    assert allocate_sparsity(scores, sizes, 0.4, "proportional") == pytest.approx({n: 0.4 for n in sizes})


def test_block_granularity_gives_one_ratio_per_block():
    scores = {"b0.q": 0.2, "b0.k": 0.4, "b1.q": 0.9, "b1.k": 1.1}
    sizes = {n: 1000 for n in scores}
    blocks = {n: n.split(".")[0] for n in scores}
    ratios = allocate_by_granularity(scores, sizes, blocks, 0.5, "proportional", 0.2, "block")
    assert ratios["b0.q"] == ratios["b0.k"] > ratios["b1.q"] == ratios["b1.k"]
    assert global_sparsity(ratios, sizes) == pytest.approx(0.5)


def test_snap_to_rows_gives_whole_weights_per_row():
    snapped = snap_to_rows({"a": 0.4999, "b": 0.123}, {"a": 64, "b": 100})
    assert snapped == {"a": 32 / 64, "b": 12 / 100}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=0.5, max_delta=-0.1), "max_delta must be >= 0"),
        (dict(sparsity=0.95, max_delta=0.1), "lower max_delta below"),
        (dict(sparsity=0.5, allocation="owl"), "allocation must be one of"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate_sparsity({"a": 1.0}, {"a": 10}, **kwargs)


def test_mismatched_layers_are_refused():
    with pytest.raises(ValueError, match="same layers"):
        allocate_sparsity({"a": 1.0}, {"b": 10}, 0.5)
    with pytest.raises(ValueError, match="finite"):
        allocate_sparsity({"a": float("nan")}, {"a": 10}, 0.5)
