"""Streaming diversity statistics against a brute-force pairwise computation."""

import itertools
import math

import pytest
import torch

from tamp_modifier import modality_diversity
from tamp_modifier.pruning.diversity import DiversityAccumulator


def brute_force(outputs, labels, modalities):
    """Mean pairwise cosine distance, from the full N x N matrix, in float64."""
    z = outputs.double()
    norms = z.norm(dim=-1, keepdim=True)
    z = torch.where(norms > 0, z / norms.clamp(min=1e-300), torch.zeros_like(z))
    dist = 1 - z @ z.T
    idx = {m: [i for i in range(len(labels)) if labels[i] == k] for k, m in enumerate(modalities)}
    terms = {}
    for m, members in idx.items():
        pairs = [dist[i, j].item() for i in members for j in members if i != j]
        if pairs:
            terms[(m, m)] = sum(pairs) / len(pairs)
    for a, b in itertools.combinations(modalities, 2):
        pairs = [dist[i, j].item() for i in idx[a] for j in idx[b]]
        if pairs:
            terms[(a, b)] = sum(pairs) / len(pairs)
    return terms


def as_terms(result):
    terms = {(m, m): v for m, v in result["intra"].items()}
    terms.update(result["inter"])
    return terms


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_modalities", [1, 2, 3])
def test_matches_brute_force(seed, num_modalities):
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 16
    outputs = torch.randn(n, d, generator=g) + torch.randn(d, generator=g)  # correlated tokens
    labels = torch.randint(0, num_modalities, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -1  # padding
    names = ["text", "image", "audio"][:num_modalities]
    got = modality_diversity(outputs, labels, names)
    want = brute_force(outputs, labels, names)
    assert as_terms(got).keys() == want.keys()
    for key, value in want.items():
        assert as_terms(got)[key] == pytest.approx(value, abs=1e-5)
    assert got["score"] == pytest.approx(sum(want.values()) / len(want), abs=1e-5)


def test_zero_rows_and_identical_tokens():
    outputs = torch.zeros(6, 4)
    outputs[:3] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # three identical text tokens
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # image tokens are all-zero rows
    got = modality_diversity(outputs, labels, ["text", "image"])
    want = brute_force(outputs, labels, ["text", "image"])
    assert got["intra"]["text"] == pytest.approx(0.0, abs=1e-6)
    for key, value in want.items():
        assert as_terms(got)[key] == pytest.approx(value, abs=1e-6)


def test_undefined_terms_are_left_out():
    outputs = torch.randn(3, 8)
    got = modality_diversity(outputs, torch.tensor([0, 0, 1]), ["text", "image"])
    assert set(got["intra"]) == {"text"}  # one image token: no image pair
    assert set(got["inter"]) == {("text", "image")}
    single = modality_diversity(torch.randn(1, 8), torch.tensor([0]), ["text"])
    assert math.isnan(single["score"])


def test_accumulator_averages_each_term_over_defining_samples():
    g = torch.Generator().manual_seed(0)
    names = ["text", "image"]
    samples = [
        (torch.randn(10, 8, generator=g), torch.tensor([0] * 4 + [1] * 6)),
        (torch.randn(7, 8, generator=g), torch.tensor([0] * 6 + [1])),  # no image pair
        (torch.randn(5, 8, generator=g), torch.tensor([0] * 5)),  # text only
    ]
    acc = DiversityAccumulator(names)
    for out, lab in samples:
        acc.update(out, lab)
    per_sample = [brute_force(out, lab, names) for out, lab in samples]
    for key in [("text", "text"), ("image", "image"), ("text", "image")]:
        values = [t[key] for t in per_sample if key in t]
        assert acc.terms()[key] == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert acc.score() == pytest.approx(sum(acc.terms().values()) / 3)


def test_batched_update_equals_one_sample_at_a_time():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 12, 8, generator=g)
    lab = torch.randint(-1, 2, (3, 12), generator=g)
    batched, single = DiversityAccumulator(["text", "image"]), DiversityAccumulator(["text", "image"])
    batched.update(out, lab)
    for b in range(3):
        single.update(out[b], lab[b])
    assert batched.terms() == pytest.approx(single.terms())


def test_half_precision_outputs_are_scored_in_float32():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(30, 16, generator=g)
    lab = torch.randint(0, 2, (30,), generator=g)
    want = modality_diversity(out.bfloat16().float(), lab, ["text", "image"])["score"]
    got = modality_diversity(out.bfloat16(), lab, ["text", "image"])["score"]
    assert got == pytest.approx(want, abs=1e-6)


def test_rejects_batched_input():
    with pytest.raises(ValueError, match="one sample"):
        modality_diversity(torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.long))
