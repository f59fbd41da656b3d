"""Token pruning's pure parts: knee rules on hand-computed curves, scores, re-padding, accounting."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tamp_modifier.token_pruning import SampleCounts, cls_attention, cls_cosine, keep_mask, knee_count
from tamp_modifier.token_pruning.knee import clamp_count
from tamp_modifier.token_pruning.scores import received_attention
from tamp_modifier.token_pruning.token_drop import gather_tokens, repack

# ---------------------------------------------------------------- knee rules


@pytest.mark.parametrize(
    "curve, expected",
    [
        # one spike: distances below the chord y = 1 - x are [0, 2/3, 1/3, 0] -> knee at 1, keep 1
        ([1.0, 0.0, 0.0, 0.0], 1),
        # [0, -0.233, 0.233, 0] -> knee at index 2: keep the two high ones
        ([1.0, 0.9, 0.1, 0.0], 2),
        # y = [1, .5, .2, .1, .05, 0], x = i/5: 1-x-y = [0, .3, .4, .3, .15, 0] -> knee at 2
        ([1.0, 0.5, 0.2, 0.1, 0.05, 0.0], 2),
        # a concave curve has no point below the chord: no long tail, keep all
        ([1.0, 1.0, 1.0, 0.0], 4),
        # a flat curve: keep all
        ([0.3, 0.3, 0.3], 3),
        # order of the input does not matter, only the sorted curve
        ([0.0, 0.0, 1.0, 0.0], 1),
    ],
)
def test_kneedle_on_hand_computed_curves(curve, expected):
    assert knee_count(torch.tensor(curve), "kneedle") == expected


def test_kneedle_on_a_long_tail():
    # 1/i^2 for i = 1..10: normalised y_i = (1/i^2 - 0.01) / 0.99; x_i = (i-1)/9.
    # distances 1 - x - y: 0.646 at i = 2, 0.676 at i = 3, 0.614 at i = 4; the knee is i = 3,
    # so the 2 tokens before it are kept.
    curve = torch.tensor([1 / i**2 for i in range(1, 11)])
    y = [(1 / i**2 - 0.01) / 0.99 for i in range(1, 11)]
    dist = [1 - (i - 1) / 9 - y[i - 1] for i in range(1, 11)]
    assert max(range(10), key=dist.__getitem__) == 2
    assert knee_count(curve, "kneedle") == 2


@pytest.mark.parametrize(
    "curve, expected",
    [
        ([5.0, 4.0, 1.0, 0.5], 2),  # drops 1, 3, 0.5: cut after the second
        ([3.0, 1.0, 0.9, 0.8], 1),
        ([2.0, 2.0, 2.0], 3),  # no drop: keep all
    ],
)
def test_largest_drop(curve, expected):
    assert knee_count(torch.tensor(curve), "largest_drop") == expected


def test_iqr_keeps_only_outliers():
    # 1..8 and 100: sorted, q1 = 3 and q3 = 7 (linear interpolation, positions 2 and 6 of 0..8),
    # threshold 7 + 1.5 * 4 = 13: only 100 is above it.
    assert knee_count(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 100]), "iqr") == 1
    # q1 = 0, q3 = 0 + 0.25 * 2 = 0.5 (position 5.25 of 0..7): threshold 1.25, so 2 and 3 are outliers
    assert knee_count(torch.tensor([0.0, 0, 0, 0, 0, 0, 2, 3]), "iqr") == 2
    # no outliers at all: zero, and the clamp then decides
    assert knee_count(torch.tensor([1.0, 2, 3, 4]), "iqr") == 0
    kept = keep_mask(torch.tensor([1.0, 2, 3, 4]), "iqr", min_tokens=1)
    assert kept.tolist() == [False, False, False, True]


def test_unknown_rule_and_shape_are_refused():
    with pytest.raises(ValueError, match="unknown knee rule 'elbow'"):
        knee_count(torch.ones(3), "elbow")
    with pytest.raises(ValueError, match="1-D"):
        knee_count(torch.ones(2, 3))


def test_clamp_and_keep_mask_keep_original_order():
    assert clamp_count(1, 10, min_tokens=3) == 3
    assert clamp_count(8, 10, max_tokens=5) == 5
    assert clamp_count(8, 4, min_tokens=6) == 4
    scores = torch.tensor([0.1, 0.9, 0.05, 1.0, 0.0, 0.0])
    mask = keep_mask(scores, "kneedle")
    assert mask.tolist() == [False, True, False, True, False, False]
    assert keep_mask(scores, "kneedle", min_tokens=3).tolist() == [True, True, False, True, False, False]
    assert keep_mask(scores, "kneedle", max_tokens=1).tolist() == [False, False, False, True, False, False]
    # a fixed ratio (FastV): half of 6 = the 3 highest
    assert keep_mask(scores, keep_ratio=0.5).tolist() == [True, True, False, True, False, False]
    # ties at the cut go to the earlier token
    tied = keep_mask(torch.tensor([1.0, 1.0, 1.0, 0.0]), keep_ratio=0.5)
    assert tied.tolist() == [True, True, False, False]


# ---------------------------------------------------------------- scores


def test_cls_attention_matches_a_per_head_loop():
    torch.manual_seed(0)
    b, t, heads, hd = 2, 6, 3, 4
    q, k = torch.randn(b, t, heads * hd), torch.randn(b, t, heads * hd)
    scale = hd**-0.5
    got = cls_attention(q, k, heads, scale)
    for s in range(b):
        per_head = []
        for h in range(heads):
            qh, kh = q[s, 0, h * hd:(h + 1) * hd], k[s, :, h * hd:(h + 1) * hd]
            logits = [float(qh @ kh[j]) * scale for j in range(t)]
            z = sum(math.exp(v) for v in logits)
            per_head.append([math.exp(v) / z for v in logits])
        want = [sum(p[j] for p in per_head) / heads for j in range(1, t)]
        assert got[s].tolist() == pytest.approx(want, abs=1e-6)


def test_cls_cosine():
    hidden = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 1.0]]])
    assert cls_cosine(hidden)[0].tolist() == pytest.approx([1.0, 0.0, -1 / math.sqrt(2)])


def test_received_attention_averages_over_queries_that_see_the_key():
    attn = torch.tensor([[
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.2, 0.3, 0.5, 0.0],
        [0.1, 0.2, 0.3, 0.4],
    ]])
    queries = torch.tensor([[False, False, True, True]])
    # key 0, 1: mean of rows 2, 3; key 2: rows 2, 3; key 3: row 3 only (row 2 cannot see it)
    want = [(0.2 + 0.1) / 2, (0.3 + 0.2) / 2, (0.5 + 0.3) / 2, 0.4]
    assert received_attention(attn, queries)[0].tolist() == pytest.approx(want)


# ---------------------------------------------------------------- layout and accounting


def test_repack_against_brute_force():
    torch.manual_seed(1)
    keep = torch.rand(5, 9) > 0.5
    keep[2] = False
    keep[3] = True
    index, valid = repack(keep)
    width = int(keep.sum(1).max())
    assert index.shape == valid.shape == (5, width)
    for r in range(5):
        kept = keep[r].nonzero()[:, 0].tolist()
        assert valid[r].tolist() == [False] * (width - len(kept)) + [True] * len(kept)
        assert index[r][valid[r]].tolist() == kept  # original order
    x = torch.arange(5 * 9 * 2).view(5, 9, 2)
    got = gather_tokens(x, index)
    for r in range(5):
        assert torch.equal(got[r][valid[r]], x[r][keep[r]])


def test_sample_counts_shares_and_flops():
    c = SampleCounts(tokens=10, visual=8, stage1_tokens=6, stage1_visual=4, stage2_tokens=4, stage2_visual=2,
                     num_layers=4, layer=1)
    assert c.tokens_per_layer() == [6, 4, 4, 4]
    assert c.visual_share() == 0.5 and c.input_share() == 0.6
    assert c.layer_share() == pytest.approx(18 / 40)
    d, m = 3, 5
    def one(n):
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert c.flops(d, m) == one(6) + 3 * one(4)


# ---------------------------------------------------------------- imports


def test_token_pruning_imports_without_llmcompressor():
    """Token pruning needs no llm-compressor: importing it (and its entry point) loads none, in a fresh
    interpreter that imports this checkout's package."""
    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys, tamp_modifier.token_pruning; assert 'llmcompressor' not in sys.modules; "
            "from tamp_modifier.token_pruning import enable_token_pruning; "
            "assert 'llmcompressor' not in sys.modules; "
            "import tamp_modifier; assert tamp_modifier.__file__.startswith(sys.argv[1]), "
            "tamp_modifier.__file__")
    env = dict(os.environ, PYTHONPATH=str(src))
    done = subprocess.run([sys.executable, "-c", code, str(src)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
