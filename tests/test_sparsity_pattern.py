"""Pattern measurement: N:M shares and survival, against brute-force counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from tamp_modifier.pruning.sparsity_pattern import (
    PATTERN_TOLERANCE,
    compare_patterns,
    layer_pattern,
    nm_share,
)


def brute_nm_share(weight, n, m):
    rows, cols = weight.shape
    groups = [(r, c) for r in range(rows) for c in range(0, cols, m)]
    good = sum(sum(1 for k in range(m) if weight[r, c + k].item() == 0) >= n for r, c in groups)
    return good / len(groups)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_share_matches_a_group_by_group_count(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    weight = torch.randn(7, 32, generator=g)
    weight[torch.rand(7, 32, generator=g) < 0.45] = 0
    assert nm_share(weight, n, m) == pytest.approx(brute_nm_share(weight, n, m))


def test_nm_share_of_rows_that_cannot_hold_the_pattern_is_zero():
    assert nm_share(torch.zeros(3, 6), 2, 4) == 0.0


def test_layer_pattern_reads_fp8_and_integer_storage():
    weight = torch.tensor([[0.0, 0.5, 0.0, -1.0], [0.25, 0.0, 0.0, 2.0]])
    for stored in (weight, weight.to(torch.float8_e4m3fn), (weight * 4).to(torch.int8)):
        got = layer_pattern(stored, "2:4")
        assert got == {"sparsity": 4 / 8, "nm_share": 1.0}
    assert layer_pattern(weight)["nm_share"] is None


def test_compare_patterns_weights_layers_by_size_and_flags_breaks():
    expected = {
        "a": {"sparsity": 0.5, "mask_structure": "0:0", "num_weights": 100},
        "b": {"sparsity": None, "mask_structure": "2:4", "num_weights": 300},
        "c": {"sparsity": 0.7, "mask_structure": "0:0", "num_weights": 100},
    }
    measured = {
        "a": {"sparsity": 0.5 - PATTERN_TOLERANCE / 2, "nm_share": None},  # within tolerance
        "b": {"sparsity": 0.49, "nm_share": 0.9},                          # groups refilled
        "c": {"sparsity": 0.6, "nm_share": None},                          # zeros refilled
    }
    got = compare_patterns(expected, measured)
    assert not got["intact"]
    assert got["broken"] == ["b", "c"]
    assert got["sparsity"]["expected"] == pytest.approx((50 + 150 + 70) / 500)
    assert got["sparsity"]["measured"] == pytest.approx((100 * measured["a"]["sparsity"] + 147 + 60) / 500)
    assert got["nm_share"] == pytest.approx(0.9)
    intact = compare_patterns({"a": expected["a"]}, {"a": measured["a"]})
    assert intact["intact"] and intact["broken"] == []


def test_compare_patterns_refuses_unmeasured_layers():
    with pytest.raises(KeyError, match="no measurement"):
        compare_patterns({"x": {"sparsity": 0.5, "mask_structure": "0:0", "num_weights": 4}}, {})


def test_every_2_of_4_choice_is_recognised():
    for zeros in itertools.combinations(range(4), 2):
        row = torch.ones(1, 4)
        row[0, list(zeros)] = 0
        assert nm_share(row, 2, 4) == 1.0
    assert nm_share(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), 2, 4) == 0.0
