"""The fidelity metrics against hand-computed KL / NLL / agreement on a tiny case."""

import math

import pytest
import torch

from tamp_modifier.demo.fidelity import fidelity


def test_kl_nll_and_agreement_by_hand():
    dense = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    pruned = torch.tensor([[0.6, 0.3, 0.1], [0.25, 0.25, 0.5], [0.4, 0.3, 0.3]])
    answers, families = [0, 1, 2], ["colour", "colour", "count"]
    got = fidelity(dense.log(), pruned.log(), answers, families)

    kl = [0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.1),
          0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.25),  # the 0-probability token adds 0
          0.1 * math.log(0.1 / 0.4) + 0.1 * math.log(0.1 / 0.3) + 0.8 * math.log(0.8 / 0.3)]
    nll = [-math.log(0.6), -math.log(0.25), -math.log(0.3)]
    same = [1.0, 0.0, 0.0]  # row 1: dense ties at index 0 (first maximum), pruned picks 2; row 2: 2 vs 0
    assert got["colour"]["kl"] == pytest.approx((kl[0] + kl[1]) / 2)
    assert got["count"]["kl"] == pytest.approx(kl[2])
    assert got["overall"]["kl"] == pytest.approx(sum(kl) / 3)
    assert got["overall"]["nll"] == pytest.approx(sum(nll) / 3)
    assert got["overall"]["nll_dense"] == pytest.approx(-(math.log(0.7) + math.log(0.5) + math.log(0.8)) / 3)
    assert got["colour"]["agreement"] == pytest.approx(0.5) and got["count"]["agreement"] == 0.0
    assert got["overall"]["agreement"] == pytest.approx(sum(same) / 3)
    assert got["colour"]["questions"] == 2 and got["overall"]["questions"] == 3


def test_identical_models_have_zero_kl_and_full_agreement():
    log_probs = torch.log_softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), -1)
    got = fidelity(log_probs, log_probs.clone(), [0, 1, 2, 3, 4], ["a"] * 5)["overall"]
    assert got["kl"] == pytest.approx(0.0, abs=1e-12) and got["agreement"] == 1.0
    assert got["nll"] == got["nll_dense"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="equal shape"):
        fidelity(torch.zeros(2, 3), torch.zeros(2, 4), [0, 0], ["a", "a"])
