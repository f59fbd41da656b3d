"""Magnitude and OWL baselines, each against an independent brute-force computation."""

from __future__ import annotations

import pytest
import torch
from conftest import language_linears, run_oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier

from tamp_modifier.testing.baselines import (
    input_channel_norms,
    magnitude_prune,
    outlier_ratios,
    owl_sparsities,
    owl_sparsity_list,
)
from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def assert_rows_lose_smallest(before, after, count):
    """Every row of ``after`` is ``before`` with exactly its ``count`` smallest |W| zeroed."""
    for r in range(before.shape[0]):
        row = before[r].tolist()
        smallest = sorted(range(len(row)), key=lambda k: abs(row[k]))[:count]
        zeros = [k for k in range(len(row)) if after[r, k].item() == 0]
        assert sorted(zeros) == sorted(smallest), r
        for k in range(len(row)):
            assert after[r, k].item() == (0.0 if k in smallest else row[k])


def assert_two_of_four(before, after):
    """Each group of 4 consecutive inputs lost exactly its 2 smallest |W|."""
    for r in range(before.shape[0]):
        for g in range(0, before.shape[1], 4):
            group = before[r, g : g + 4].tolist()
            smallest = sorted(range(4), key=lambda k: abs(group[k]))[:2]
            zeros = [k for k in range(4) if after[r, g + k].item() == 0]
            assert sorted(zeros) == sorted(smallest), (r, g)


# ---------------------------------------------------------------- magnitude


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_prunes_the_smallest_of_every_row(sparsity):
    model = small_mlp()
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    realized = magnitude_prune(model, sparsity)
    assert set(realized) == {"0", "2"}
    for name, weight in before.items():
        count = round(weight.shape[1] * sparsity)
        after = model.get_submodule(name).weight
        assert_rows_lose_smallest(weight, after, count)
        assert realized[name] == pytest.approx(count / weight.shape[1], abs=1e-9)


def test_magnitude_two_of_four_on_mlp():
    model = small_mlp(1)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    realized = magnitude_prune(model, 0.0, mask_structure="2:4")
    for name, weight in before.items():
        assert_two_of_four(weight, model.get_submodule(name).weight)
        assert realized[name] == 0.5


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_magnitude_on_tiny_llava_prunes_language_linears_only(structure):
    model = build_tiny_model("llava")
    targets = language_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    realized = magnitude_prune(model, 0.3, mask_structure=structure)
    assert set(realized) == set(targets)
    for name, module in targets.items():
        weight = before[f"{name}.weight"]
        if structure == "0:0":
            assert_rows_lose_smallest(weight, module.weight, round(weight.shape[1] * 0.3))
        else:
            assert_two_of_four(weight, module.weight)
    pruned = {f"{n}.weight" for n in targets}
    for key, value in model.state_dict().items():
        if key not in pruned:  # vision tower, projector, lm_head, norms, embeddings
            assert torch.equal(value, before[key]), key
    assert any(k.startswith("model.vision_tower") for k in before)
    assert "re:.*lm_head" in TOWER_IGNORE


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_magnitude_rejects_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_prune(small_mlp(), sparsity)


@pytest.mark.parametrize("targets, ignore", [(["Conv2d"], []), (["Linear"], ["re:.*"]), (["re:nothing"], [])])
def test_magnitude_rejects_targets_matching_nothing(targets, ignore):
    model = small_mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="match no module"):
        magnitude_prune(model, 0.5, targets=targets, ignore=ignore)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------- activation norms


class TwoPaths(torch.nn.Module):
    """Text path embed -> a -> relu -> b; an image path c over a sequence of another length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = torch.nn.Embedding(10, 4)
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(3, 2)
        self.c = torch.nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None, pixel_values=None):
        if pixel_values is not None:
            self.c(pixel_values)
        return self.b(torch.relu(self.a(self.embed(input_ids))))


def hand_norms(model, batches):
    """sqrt(mean x^2) per channel over the inputs captured by re-running the pieces by hand."""
    tokens = {"a": [], "b": [], "c": []}
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
            xa = model.embed(ids)
            xb = torch.relu(model.a(xa))
            for i in range(ids.shape[0]):
                for j in range(ids.shape[1]):
                    if mask is None or mask[i, j] == 1:
                        tokens["a"].append(xa[i, j].tolist())
                        tokens["b"].append(xb[i, j].tolist())
            if "pixel_values" in batch:  # its length differs from the mask: every token counts
                tokens["c"] += batch["pixel_values"].reshape(-1, 4).tolist()
    norms = {}
    for name, rows in tokens.items():
        cols = len(rows[0])
        norms[name] = [(sum(r[k] ** 2 for r in rows) / len(rows)) ** 0.5 for k in range(cols)]
    return norms


def test_input_channel_norms_match_a_hand_computation_and_skip_padding():
    model = TwoPaths()
    g = torch.Generator().manual_seed(3)
    batches = [
        {"input_ids": torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
         "pixel_values": torch.randn(2, 7, 4, generator=g)},
        {"input_ids": torch.tensor([[0, 8, 9]]), "attention_mask": torch.tensor([[0, 1, 1]])},
        {"input_ids": torch.tensor([[3, 3]])},  # no mask: all tokens
    ]
    norms = input_channel_norms(model, batches)
    assert set(norms) == {"a", "b", "c"}
    expected = hand_norms(model, batches)
    for name, values in expected.items():
        assert norms[name].dtype == torch.float32
        assert norms[name].tolist() == pytest.approx(values, rel=1e-5), name

    # Padding counts: with the mask dropped the norms change.
    unmasked = [{k: v for k, v in b.items() if k != "attention_mask"} for b in batches]
    assert norms["a"].tolist() != pytest.approx(input_channel_norms(model, unmasked)["a"].tolist(), rel=1e-3)


def test_input_channel_norms_remove_hooks_on_error():
    model = TwoPaths()
    good = [{"input_ids": torch.tensor([[1, 2, 3]]), "pixel_values": torch.ones(1, 2, 4)}]
    first = input_channel_norms(model, good)
    bad = good + [{"input_ids": torch.tensor([[1]]), "pixel_values": torch.ones(1, 2, 7)}]
    with pytest.raises(RuntimeError):
        input_channel_norms(model, bad)
    assert all(not m._forward_pre_hooks for m in model.modules())
    again = input_channel_norms(model, good)  # no hook left behind to count twice
    assert all(torch.equal(again[n], first[n]) for n in "abc")


# ---------------------------------------------------------------- outlier ratios


def nested_model(seed=4):
    torch.manual_seed(seed)
    lin = torch.nn.Linear
    seq = torch.nn.Sequential
    model = seq(seq(lin(6, 5), lin(5, 7)), seq(lin(7, 4)), seq(lin(4, 3)))
    with torch.no_grad():  # a few large weights, in different amounts per block
        model[0][0].weight[0, :3] = 4.0
        model[0][1].weight[2, 1] = -3.0
        model[1][0].weight[1, 2] = 5.0
        model[2][0].weight.mul_(100.0)  # scale alone makes no outlier
    return model


def brute_force_ratio(model, norms, block, m):
    # One threshold for the whole block: m times the mean score over all its weights.
    scores = []
    for name, norm in norms.items():
        if not name.startswith(block + "."):
            continue
        w = model.get_submodule(name).weight.tolist()
        scores += [abs(w[r][k]) * norm[k].item() for r in range(len(w)) for k in range(len(w[0]))]
    mean = sum(scores) / len(scores)
    return sum(1 for s in scores if s > m * mean) / len(scores)


@pytest.mark.parametrize("m", [5.0, 2.0, 1.0])
def test_outlier_ratios_match_brute_force(m):
    model = nested_model()
    g = torch.Generator().manual_seed(5)
    norms = {n: torch.rand(mod.in_features, generator=g) + 0.1
             for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    ratios = outlier_ratios(model, norms, ["0", "1", "2"], m)
    for block in ("0", "1", "2"):
        assert ratios[block] == pytest.approx(brute_force_ratio(model, norms, block, m), abs=1e-12), block
    if m == 5.0:
        assert ratios["0"] > 0 and ratios["1"] > 0


def test_outlier_ratios_reject_an_empty_block():
    model = nested_model()
    norms = {"0.0": torch.ones(6)}
    with pytest.raises(ValueError, match="block '1'"):
        outlier_ratios(model, norms, ["0", "1"])


# ---------------------------------------------------------------- OWL sparsities


def test_owl_sparsities_hand_computed():
    # t = 2 * 0.08 * (D - 0) / 0.1 = [0, 0.16, 0.04], mean(t) = 0.2 / 3
    # sparsity = 0.5 + mean(t) - t
    got = owl_sparsities({"a": 0.0, "b": 0.1, "c": 0.025}, 0.5, lam=0.08)
    assert got == pytest.approx({"a": 0.5 + 0.2 / 3, "b": 0.5 + 0.2 / 3 - 0.16, "c": 0.5 + 0.2 / 3 - 0.04})
    assert got == pytest.approx({"a": 0.566667, "b": 0.406667, "c": 0.526667}, abs=1e-6)


def test_owl_sign_mean_and_spread():
    ratios = {"x": 0.003, "y": 0.011, "z": 0.001, "w": 0.004}
    got = owl_sparsities(ratios, 0.6, lam=0.1)
    assert min(got, key=got.get) == "y"  # most outliers -> least sparsity
    assert max(got, key=got.get) == "z"  # fewest outliers -> most sparsity
    order = sorted(ratios, key=ratios.get)
    assert [got[b] for b in order] == sorted(got.values(), reverse=True)
    assert sum(got.values()) / len(got) == pytest.approx(0.6, abs=1e-12)
    assert max(got.values()) - min(got.values()) == pytest.approx(0.2, abs=1e-12)


def test_owl_equal_ratios_give_uniform_sparsity():
    assert owl_sparsities({"a": 0.02, "b": 0.02}, 0.7) == pytest.approx({"a": 0.7, "b": 0.7})


@pytest.mark.parametrize("sparsity, lam", [(0.05, 0.08), (0.95, 0.08)])
def test_owl_rejects_sparsities_out_of_range(sparsity, lam):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        owl_sparsities({"a": 0.0, "b": 1.0}, sparsity, lam)


def test_owl_sparsity_list_errors():
    model = build_tiny_model("llava")
    with pytest.raises(ValueError, match="lies in none of the blocks"):
        owl_sparsity_list(model, {"model.language_model.layers.0": 0.5})
    blocks = {f"model.language_model.layers.{i}": 0.4 + 0.2 * i for i in range(2)}
    with pytest.raises(ValueError, match="different sparsities"):
        owl_sparsity_list(model, blocks, targets=["re:.*language_model$"])


# ---------------------------------------------------------------- end to end


def test_owl_wanda_end_to_end_on_tiny_llava(tiny):
    model, tokenizer, _ = tiny("llava", num_layers=3)
    data = make_calibration_dataset(model, 4)
    blocks = [f"model.language_model.layers.{i}" for i in range(3)]
    ratios = outlier_ratios(model, input_channel_norms(model, list(data)), blocks)
    block_sparsity = owl_sparsities(ratios, 0.5, lam=0.1)
    assert len({round(s, 6) for s in block_sparsity.values()}) == 3  # not uniform
    values = owl_sparsity_list(model, block_sparsity)

    # Wanda wants one value for every module `targets` matches, ignored or not.
    from compressed_tensors.utils import match_named_modules

    every_linear = [n for n, _ in match_named_modules(model, ["Linear"])]
    assert len(values) == len(every_linear) > len(language_linears(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    pruner = WandaPruningModifier(sparsity=values, targets=["Linear"], ignore=TOWER_IGNORE)
    run_oneshot(model, tokenizer, data, [pruner])

    targets = language_linears(model)
    for name, module in targets.items():
        block = name.split(".self_attn")[0].split(".mlp")[0]
        cols = module.weight.shape[1]
        per_row = (module.weight == 0).sum(dim=1)
        assert (per_row == int(cols * block_sparsity[block])).all(), name
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") not in targets:
            assert torch.equal(value, before[key]), key


def test_wanda_refuses_a_list_over_the_non_ignored_modules_only(tiny):
    """Why owl_sparsity_list also gives ignored targets a value."""
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 2)
    short = [0.5] * len(language_linears(model))
    pruner = WandaPruningModifier(sparsity=short, targets=["Linear"], ignore=TOWER_IGNORE)
    with pytest.raises(ValueError, match="sparsities values"):
        run_oneshot(model, tokenizer, data, [pruner])
