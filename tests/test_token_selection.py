"""select_tokens against a naive float64 implementation of the spec's greedy procedure."""

from __future__ import annotations

import math

import pytest
import torch

from tamp_modifier import select_tokens
from tamp_modifier.pruning.token_selection import attention_tokens, random_tokens


def naive_select(outputs, attention, labels, knn=3, gamma=1.0, penalty_gamma=0.2, mmd_scale=0.1):
    """The spec written out plainly: full matrices, MMD recomputed from scratch each step."""
    z = outputs.double()
    z = z / z.norm(dim=-1, keepdim=True)
    n = len(z)
    dist = 1 - z @ z.T
    kern = torch.exp(-gamma * dist)
    a = attention.double()
    k = min(knn, n - 1)
    nbrs = []
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: (dist[i, j].item(), j))
        nbrs.append(others[:k])
    g = [a[i].item() + sum(kern[i, j].item() * a[j].item() for j in nbrs[i]) for i in range(n)]
    # this sample's diversity: mean of the defined intra/inter terms
    terms = []
    groups = [torch.nonzero(labels == m).flatten().tolist() for m in sorted(set(labels.tolist()))]
    for grp in groups:
        if len(grp) >= 2:
            pairs = [dist[i, j].item() for i in grp for j in grp if i != j]
            terms.append(sum(pairs) / len(pairs))
    for x in range(len(groups)):
        for y in range(x + 1, len(groups)):
            terms.append(dist[groups[x]][:, groups[y]].mean().item())
    s = sum(terms) / len(terms) if terms else float("nan")
    chosen = []
    while True:
        i = max((j for j in range(n) if j not in chosen), key=lambda j: (g[j], -j))
        chosen.append(i)
        for j in nbrs[i]:
            g[j] -= math.exp(-penalty_gamma * dist[i, j].item()) * max(g[i], 0.0)
        sel = torch.tensor(chosen)
        mmd = kern.mean() + kern[sel][:, sel].mean() - 2 * kern[:, sel].mean()
        if not (math.isfinite(s) and s > 0) or len(chosen) == n or mmd.item() < mmd_scale * math.sqrt(s):
            return chosen


def softmax_attention(n, generator):
    return torch.softmax(torch.randn(n, generator=generator) * 2, 0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mmd_scale", [0.1, 0.02])
def test_matches_naive_spec(seed, mmd_scale):
    g = torch.Generator().manual_seed(seed)
    n = 48
    outputs = torch.randn(n, 12, generator=g) + 0.5 * torch.randn(12, generator=g)
    labels = (torch.arange(n) >= 10).long()  # 10 text, 38 image tokens
    attention = softmax_attention(n, g)
    got = select_tokens(outputs, attention, labels, mmd_scale=mmd_scale)
    assert got.tolist() == naive_select(outputs, attention, labels, mmd_scale=mmd_scale)


@pytest.mark.parametrize("knn, gamma, penalty_gamma", [(1, 1.0, 0.2), (5, 2.0, 1.0), (3, 0.5, 0.0)])
def test_matches_naive_spec_other_settings(knn, gamma, penalty_gamma):
    g = torch.Generator().manual_seed(11)
    outputs, attention = torch.randn(30, 8, generator=g), softmax_attention(30, g)
    labels = torch.randint(0, 3, (30,), generator=g)
    kwargs = dict(knn=knn, gamma=gamma, penalty_gamma=penalty_gamma, mmd_scale=0.05)
    assert select_tokens(outputs, attention, labels, **kwargs).tolist() == naive_select(
        outputs, attention, labels, **kwargs
    )


def test_single_modality():
    g = torch.Generator().manual_seed(3)
    outputs, attention = torch.randn(25, 6, generator=g), softmax_attention(25, g)
    labels = torch.zeros(25, dtype=torch.long)
    got = select_tokens(outputs, attention, labels, mmd_scale=0.05)
    assert got.tolist() == naive_select(outputs, attention, labels, mmd_scale=0.05)


def test_ties_go_to_the_lowest_index():
    outputs = torch.eye(4).repeat_interleave(2, 0)  # pairs of identical tokens
    attention = torch.full((8,), 1 / 8)  # every g ties
    labels = torch.zeros(8, dtype=torch.long)
    got = select_tokens(outputs, attention, labels, mmd_scale=0.01)
    assert got.tolist() == naive_select(outputs, attention, labels, mmd_scale=0.01)
    assert got[0].item() == 0


def test_one_token_and_identical_tokens():
    assert select_tokens(torch.randn(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long)).tolist() == [0]
    same = torch.ones(6, 4)
    got = select_tokens(same, torch.full((6,), 1 / 6), torch.zeros(6, dtype=torch.long))
    assert got.tolist() == [0]  # all alike: one token represents them all


def test_selection_order_is_returned_and_all_distinct():
    g = torch.Generator().manual_seed(5)
    outputs, attention = torch.randn(60, 10, generator=g), softmax_attention(60, g)
    labels = torch.randint(0, 2, (60,), generator=g)
    got = select_tokens(outputs, attention, labels, mmd_scale=0.001)
    assert len(set(got.tolist())) == len(got) > 1
    assert got[0].item() == naive_select(outputs, attention, labels, mmd_scale=0.001)[0]


def test_float16_inputs_give_float32_result():
    g = torch.Generator().manual_seed(6)
    outputs, attention = torch.randn(40, 8, generator=g), softmax_attention(40, g)
    labels = torch.randint(0, 2, (40,), generator=g)
    half = select_tokens(outputs.half(), attention.half(), labels)
    full = select_tokens(outputs.half().float(), attention.half().float(), labels)
    assert half.tolist() == full.tolist()


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="must agree"):
        select_tokens(torch.randn(5, 4), torch.ones(4), torch.zeros(5, dtype=torch.long))


def test_attention_ablation_and_random_ablation():
    attention = torch.tensor([0.5, 0.1, 0.3, 0.1])
    assert attention_tokens(attention).tolist() == [0, 2]
    assert attention_tokens(torch.full((4,), 0.25)).tolist() == [0]
    first = random_tokens(300, 100, torch.Generator().manual_seed(1))
    again = random_tokens(300, 100, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and len(set(first.tolist())) == 100
    assert sorted(random_tokens(40, 100, torch.Generator().manual_seed(1)).tolist()) == list(range(40))
