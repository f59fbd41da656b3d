"""AMIA's per-sample loop on tensors (SelectionAccumulator), its random seed, and the end-of-run check."""

from __future__ import annotations

import pytest
import torch
from conftest import run_oneshot
from test_amia import amia
from test_token_selection import naive_select

from tamp_modifier.modifiers.adaptive_input_activation import check_every_target_pruned
from tamp_modifier.pruning.selection_accumulator import (
    SelectionAccumulator,
    TokenChoice,
    random_selection_seed,
)
from tamp_modifier.pruning.token_weighting import weighted_rows
from tamp_modifier.testing.synthetic import make_calibration_dataset


def batch(seed=0, rows=2, length=12, columns=6, outputs=5):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, length, columns, generator=g)
    out = torch.randn(rows, length, outputs, generator=g)
    labels = torch.randint(0, 3, (rows, length), generator=g)
    if rows > 1:
        labels[1, -4:] = -1  # the second sample is padded
    attention = torch.softmax(torch.randn(rows, length, generator=g), -1)
    return inputs, out, labels, attention


def run(choice, weighting="selected", selected_weight=1.0, seeds=None, data=None):
    inputs, outputs, labels, attention = data or batch()
    acc = SelectionAccumulator(3, choice, weighting, selected_weight)
    calls = []
    acc.update(inputs, outputs, labels, attention, lambda rows, w: calls.append((rows, w)), seeds)
    return acc, calls


def test_all_tokens_hands_on_every_real_row_and_counts_them():
    inputs, _, labels, _ = data = batch()
    acc, calls = run(TokenChoice("all"), data=data)
    assert len(calls) == 2
    for b, (rows, weight) in enumerate(calls):
        real = labels[b] >= 0
        assert torch.equal(rows, inputs[b][real]) and weight == int(real.sum())
    seen = torch.bincount(labels[labels >= 0], minlength=3)
    assert torch.equal(acc.seen, seen) and torch.equal(acc.selected, seen)


def test_amia_choice_is_select_tokens_on_the_real_tokens():
    inputs, outputs, labels, attention = data = batch(seed=1)
    acc, calls = run(TokenChoice("amia"), data=data)
    selected = torch.zeros(3, dtype=torch.long)
    for b, (rows, weight) in enumerate(calls):
        real = (labels[b] >= 0).nonzero().flatten()
        chosen = naive_select(outputs[b, real], attention[b, real], labels[b, real])
        assert torch.equal(rows, inputs[b, real][chosen]) and weight == len(chosen)
        selected += torch.bincount(labels[b, real][chosen], minlength=3)
    assert torch.equal(acc.selected, selected)


def test_upweighted_rows_and_token_weight():
    inputs, _, labels, _ = data = batch(seed=2)
    _, calls = run(TokenChoice("attention"), "upweighted", 4.0, data=data)
    _, plain = run(TokenChoice("attention"), data=data)  # the same tokens, weight = their count
    for b, ((rows, weight), (_, chosen_count)) in enumerate(zip(calls, plain)):
        real = labels[b] >= 0
        assert weight == int(real.sum()) + 3.0 * chosen_count
        assert rows.shape == inputs[b][real].shape


def test_random_choice_follows_its_seeds():
    data = batch(seed=3, length=30)
    choice = TokenChoice("random", random_tokens=5)
    first = run(choice, seeds=[11, 12], data=data)[1]
    again = run(choice, seeds=[11, 12], data=data)[1]
    other = run(choice, seeds=[13, 12], data=data)[1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0]) and torch.equal(first[1][0], other[1][0])
    assert [w for _, w in first] == [5, 5]


def test_a_sample_without_batch_dimension():
    inputs, outputs, labels, attention = batch(seed=4, rows=1)
    acc, calls = run(TokenChoice("all"), data=(inputs[0], outputs[0], labels[0], attention))
    assert len(calls) == 1
    assert torch.equal(calls[0][0], weighted_rows(inputs[0], torch.arange(12), "selected"))
    assert torch.equal(acc.seen, torch.bincount(labels[0], minlength=3))


def test_random_seed_depends_on_layer_and_sample_only():
    seed = random_selection_seed(0, "model.layers.0.mlp.up_proj", 1234)
    assert seed == random_selection_seed(0, "model.layers.0.mlp.up_proj", 1234)
    assert seed != random_selection_seed(0, "model.layers.1.mlp.up_proj", 1234)
    assert seed != random_selection_seed(0, "model.layers.0.mlp.up_proj", 1235)
    assert seed != random_selection_seed(1, "model.layers.0.mlp.up_proj", 1234)
    assert 0 <= seed < 2**63


# ---------------------------------------------------------------- every target pruned


def test_every_target_pruned_passes_when_all_were():
    check_every_target_pruned(["a", "b"], pruned={"a": {}, "b": {}}, calibrated=[])


def test_a_target_no_sample_reached_is_an_error():
    targets = [f"layers.{i}.mlp.expert" for i in range(5)] + ["layers.0.q_proj"]
    with pytest.raises(RuntimeError, match=r"left 5 target Linears dense \(layers\.0\.mlp\.expert, "
                                           r"layers\.1\.mlp\.expert, layers\.2\.mlp\.expert \.\.\.\): "
                                           r"no calibration sample reached them"):
        check_every_target_pruned(targets, pruned=["layers.0.q_proj"], calibrated=[])


def test_a_target_calibrated_but_never_pruned_is_an_error():
    with pytest.raises(RuntimeError, match=r"calibrated 1 target Linears but never pruned them \(b\)"):
        check_every_target_pruned(["a", "b", "c"], pruned=["a"], calibrated=["b"])


def test_a_linear_the_forward_never_calls_fails_the_run(tiny):
    model, tokenizer, _ = tiny("llava")
    mlp = model.model.language_model.layers[1].mlp
    mlp.unused = torch.nn.Linear(mlp.up_proj.in_features, 8, bias=False)  # a target no sample reaches
    data = make_calibration_dataset(model, 2, seed=19)
    with pytest.raises(RuntimeError, match=r"left 1 target Linears dense \(.*layers\.1\.mlp\.unused\)"):
        run_oneshot(model, tokenizer, data, [amia(sparsity=0.5)])
