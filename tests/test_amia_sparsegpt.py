"""AMIA's token choice inside SparseGPT (``reconstruction: sparsegpt``).

Checked against llm-compressor's own SparseGPTModifier (every token weighted 1:
the same masks and weights, bit for bit) and against a brute-force Hessian
``2/N sum_samples sum_t w_t x_t x_t^T`` built from plain forward hooks on the
dense model, with the tokens the spec's selection picks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RECIPES, assert_reloads_equal, language_linears, run_oneshot, zero_fraction
from llmcompressor.modifiers.pruning import SparseGPTModifier
from test_amia import amia, layer0_case
from test_token_selection import naive_select

from tamp_modifier import DiversityAwareSparsity, load_report
from tamp_modifier.modifiers.layer_statistics import TokenHessians
from tamp_modifier.pruning.token_weighting import token_weights, weighted_rows
from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset, save_tiny_model
from tamp_modifier.text_decoder import TOWER_IGNORE


def sgpt(**kwargs):
    return amia(**{"reconstruction": "sparsegpt", **kwargs})


def twin_models(family="llava", seed=0):
    """The same tiny model twice (same weights, same config path)."""
    a, b = build_tiny_model(family, seed=seed), build_tiny_model(family, seed=seed)
    return a, b


# ---------------------------------------------------------------- pure functions


def test_token_weights_follow_the_stated_formula():
    chosen = torch.tensor([0, 2])
    assert token_weights(4, chosen, "selected").tolist() == [1, 0, 1, 0]
    assert token_weights(4, chosen, "upweighted", 3.0).tolist() == [3, 1, 3, 1]
    x = torch.randn(4, 5, dtype=torch.float64)
    rows = weighted_rows(x, chosen, "upweighted", 3.0)
    w = token_weights(4, chosen, "upweighted", 3.0).double()
    assert torch.allclose(rows.T @ rows, (x.T * w) @ x)  # sum_t w_t x_t x_t^T
    assert torch.equal(weighted_rows(x, chosen, "selected"), x[chosen])
    assert weighted_rows(x, chosen, "upweighted", 1.0) is x  # every token, untouched
    with pytest.raises(ValueError, match="token_weighting must be one of"):
        token_weights(4, chosen, "soft")


@pytest.mark.parametrize(
    "fields, message",
    [(dict(reconstruction="obs"), "reconstruction must be one of"),
     (dict(token_weighting="soft"), "token_weighting must be one of"),
     (dict(selected_weight=0.5), "selected_weight must be >= 1"),
     (dict(block_size=0), "block_size must be >= 1")],
)
def test_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        sgpt(**fields)


# ---------------------------------------------------------------- against llm-compressor


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_every_token_gives_llm_compressors_sparsegpt_bit_for_bit(tmp_path, structure):
    ours, theirs = twin_models("llava", seed=4)
    tokenizer = save_tiny_model(ours, tmp_path / "m")
    theirs.config._name_or_path = ours.config._name_or_path
    data = make_calibration_dataset(ours, 4, seed=31)
    common = dict(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=TOWER_IGNORE)
    run_oneshot(ours, tokenizer, data, [sgpt(token_selection="all", **common)])
    run_oneshot(theirs, tokenizer, data, [SparseGPTModifier(**common)])
    a, b = language_linears(ours), language_linears(theirs)
    assert 0.45 < sum(zero_fraction(m) for m in b.values()) / len(b) < 0.55
    for name in b:
        assert torch.equal(a[name].weight, b[name].weight), name


def test_upweighting_with_weight_one_is_also_llm_compressors_sparsegpt(tmp_path):
    ours, theirs = twin_models("qwen2_vl", seed=5)
    tokenizer = save_tiny_model(ours, tmp_path / "m")
    theirs.config._name_or_path = ours.config._name_or_path
    data = make_calibration_dataset(ours, 3, seed=32)
    common = dict(sparsity=0.6, targets=["Linear"], ignore=TOWER_IGNORE)
    run_oneshot(ours, tokenizer, data, [sgpt(token_weighting="upweighted", selected_weight=1.0, **common)])
    run_oneshot(theirs, tokenizer, data, [SparseGPTModifier(**common)])
    a, b = language_linears(ours), language_linears(theirs)
    for name in b:
        assert torch.equal(a[name].weight, b[name].weight), name


# ---------------------------------------------------------------- against a brute-force Hessian


@pytest.mark.parametrize("weighting", ["selected", "upweighted"])
def test_layer0_hessians_match_a_brute_force_sum(tiny, weighting):
    model, tokenizer, data, linears, records = layer0_case(tiny, seed=33)
    image = model.config.image_token_id
    names = {id(m): n for n, m in linears.items()}
    recorded = {}
    original = TokenHessians.result

    def recording(self, module, *args):
        if id(module) in names:
            recorded[names[id(module)]] = self.hessians[module].clone()
        return original(self, module, *args)

    TokenHessians.result = recording
    try:
        recipe = [sgpt(sparsity=0.5, token_weighting=weighting, selected_weight=3.0)]
        run_oneshot(model, tokenizer, data, recipe)
    finally:
        TokenHessians.result = original

    assert recorded.keys() == linears.keys()
    for name in linears:
        h = 0
        for row, seen in zip(data, records):
            x, out = seen[name]
            attention = seen["attn"][0, :, -1].mean(0)
            labels = (row["input_ids"][0] == image).long()
            chosen = naive_select(out, attention, labels)
            w = torch.zeros(len(x), dtype=torch.float64)
            if weighting == "selected":
                w[chosen] = 1.0
            else:
                w[:] = 1.0
                w[chosen] = 3.0
            x = x.double()
            h = h + (x.T * w) @ x
        h = 2 * h / len(data)
        assert torch.allclose(recorded[name].double(), h, rtol=1e-4, atol=1e-5 * h.abs().max()), name


def test_selected_tokens_change_the_result(tiny):
    """The token choice reaches the weights: selected-only differs from every token."""
    weights = {}
    for selection in ("all", "amia"):
        model, tokenizer, _ = tiny("llava")
        data = make_calibration_dataset(model, 3, seed=34)
        run_oneshot(model, tokenizer, data, [sgpt(sparsity=0.5, token_selection=selection)])
        weights[selection] = {n: m.weight.clone() for n, m in language_linears(model).items()}
    assert any(not torch.equal(weights["all"][n], weights["amia"][n]) for n in weights["all"])


# ---------------------------------------------------------------- recipes


def test_tamp_sparsegpt_recipe_prunes_at_das_ratios(tiny, tmp_path):
    model, tokenizer, _ = tiny("qwen2_5_vl")
    data = make_calibration_dataset(model, 4, seed=35)
    dense = {n: m.weight.clone() for n, m in language_linears(model).items()}
    run_oneshot(model, tokenizer, data, str(RECIPES / "tamp_sparsegpt.yaml"), output_dir=tmp_path / "t")
    report = load_report(tmp_path / "t")
    das, amia_layers = report["das"]["layers"], report["amia"]["layers"]
    assert report["amia"]["reconstruction"] == "sparsegpt" and report["amia"]["from_das"]
    assert report["pattern"]["intact"]
    changed = 0
    for name, module in language_linears(model).items():
        # SparseGPT picks its mask over 128-column blocks: a hair off the ratio.
        assert zero_fraction(module) == pytest.approx(das[name]["assigned"], abs=0.005), name
        assert amia_layers[name]["samples"] == 4 and amia_layers[name]["loss"] >= 0
        kept = module.weight != 0
        changed += int((module.weight[kept] != dense[name][kept]).sum())  # reconstruction moved them
    assert changed > 0
    assert_reloads_equal(model, tmp_path / "t")


def test_das_with_sparsegpt_reconstruction_and_n_m_is_refused(tiny):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 2, seed=37)
    with pytest.raises(ValueError, match="N:M pattern"):
        run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(), sgpt(mask_structure="2:4")])
