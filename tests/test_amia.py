"""AdaptiveInputActivation: pruning math, token selection in oneshot, TAMP end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import RECIPES, assert_reloads_equal, language_linears, run_oneshot, zero_fraction
from llmcompressor.modifiers.pruning import WandaPruningModifier
from test_token_selection import naive_select

from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity, load_report
from tamp_modifier.pruning.wanda_rule import parse_mask_structure, prune_mask
from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE


def amia(**kwargs):
    return AdaptiveInputActivation(**{"targets": ["Linear"], "ignore": TOWER_IGNORE, **kwargs})


# ---------------------------------------------------------------- pruning math


def test_unstructured_mask_prunes_the_lowest_scores_of_every_row():
    g = torch.Generator().manual_seed(0)
    weight, norm = torch.randn(6, 40, generator=g), torch.rand(40, generator=g)
    mask = prune_mask(weight, norm, 0.3)
    for r in range(6):
        score = [abs(weight[r, k].item()) * norm[k].item() for k in range(40)]
        lowest = sorted(range(40), key=lambda k: score[k])[:12]
        assert sorted(mask[r].nonzero().flatten().tolist()) == sorted(lowest)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_mask_is_valid_and_picks_the_lowest_in_each_group(n, m):
    g = torch.Generator().manual_seed(1)
    weight, norm = torch.randn(5, 32, generator=g), torch.rand(32, generator=g)
    mask = prune_mask(weight, norm, 0.0, n, m)
    groups = mask.reshape(5, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    score = (weight.abs() * norm).reshape(5, 32 // m, m)
    kept_min = torch.where(groups, torch.inf, score).amin(-1)
    pruned_max = torch.where(groups, score, -torch.inf).amax(-1)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("bad", ["2-4", "4:2", "2:2", "x:4", "0:4", "2:4:8"])
def test_malformed_mask_structure(bad):
    with pytest.raises(ValueError, match="mask_structure must be 'N:M'"):
        parse_mask_structure(bad)
    with pytest.raises(ValueError, match="mask_structure must be 'N:M'"):
        amia(mask_structure=bad)


@pytest.mark.parametrize(
    "fields, message",
    [(dict(token_selection="topk"), "token_selection must be one of"), (dict(sparsity=1.0), r"\[0, 1\)"),
     (dict(mmd_scale=0), "mmd_scale must be > 0"), (dict(random_tokens=0), "random_tokens must be")],
)
def test_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        amia(**fields)


# ---------------------------------------------------------------- in oneshot


def dense_layer0_inputs(model, data):
    """Per sample: inputs/outputs of every layer-0 Linear and layer 0's attention row."""
    layer = model.model.language_model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    records = []
    for row in data:
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, (a[0][0], o[0])))
                 for n, m in linears.items()]
        hooks.append(layer.self_attn.register_forward_hook(lambda mod, a, o: seen.__setitem__("attn", o[1])))
        with torch.no_grad():
            model(**row)
        for h in hooks:
            h.remove()
        records.append(seen)
    return linears, records


def layer0_case(tiny, seed: int):
    """A tiny LLaVA, 3 calibration rows, and its dense layer-0 records (``dense_layer0_inputs``)."""
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 3, seed=seed)
    return (model, tokenizer, data, *dense_layer0_inputs(model, data))


@pytest.mark.parametrize("selection", ["amia", "attention"])
def test_layer0_masks_match_an_independent_computation(tiny, selection):
    model, tokenizer, data, linears, records = layer0_case(tiny, seed=11)
    image = model.config.image_token_id
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}

    run_oneshot(model, tokenizer, data, [amia(sparsity=0.5, token_selection=selection)])

    for name, module in linears.items():
        sums, count = 0, 0
        for row, seen in zip(data, records):
            x, out = seen[name]
            attention = seen["attn"][0, :, -1].mean(0)
            labels = (row["input_ids"][0] == image).long()
            if selection == "amia":
                chosen = naive_select(out, attention, labels)
            else:
                chosen = [i for i in range(len(attention)) if attention[i] > 1 / len(attention)]
            sums = sums + x[chosen].double().square().sum(0)
            count += len(chosen)
        norm = (sums / count).sqrt()
        w = weights[name]
        score = w.double().abs() * norm
        k = round(w.shape[1] * 0.5)
        expected = torch.zeros_like(w, dtype=torch.bool)
        expected.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
        assert torch.equal(module.weight == 0, expected), name


def test_all_tokens_is_plain_wanda(tiny):
    model_a, tokenizer, _ = tiny("qwen2_vl")
    model_b = build_tiny_model("qwen2_vl")
    model_b.config._name_or_path = model_a.config._name_or_path
    data = make_calibration_dataset(model_a, 4, seed=12)
    run_oneshot(model_a, tokenizer, data, [amia(sparsity=0.5, token_selection="all")])
    run_oneshot(model_b, tokenizer, data, [WandaPruningModifier(sparsity=0.5, targets=["Linear"],
                                                                 ignore=TOWER_IGNORE)])
    b = language_linears(model_b)
    a = language_linears(model_a)
    differing = sum(int(((a[n].weight == 0) != (b[n].weight == 0)).sum()) for n in a)
    total = sum(m.weight.numel() for m in b.values())
    assert differing <= total * 1e-3  # only float ties between the two sums' orders


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "qwen2_5_vl"])
def test_tamp_recipe_end_to_end(tiny, tmp_path, family):
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 4, seed=13)
    run_oneshot(model, tokenizer, data, str(RECIPES / "tamp.yaml"), output_dir=tmp_path / "t")
    report = load_report(tmp_path / "t")
    das, selection = report["das"]["layers"], report["amia"]["layers"]
    assert report["amia"]["from_das"] and set(das) == set(selection) == set(language_linears(model))
    for name, module in language_linears(model).items():
        assert zero_fraction(module) == pytest.approx(das[name]["assigned"], abs=1e-9), name
        assert selection[name]["sparsity"] == pytest.approx(das[name]["assigned"])
        assert 0 < sum(selection[name]["selected"].values()) <= sum(selection[name]["tokens"].values())
        assert selection[name]["tokens"]["image"] > selection[name]["tokens"]["text"]
    assert_reloads_equal(model, tmp_path / "t")


@pytest.mark.parametrize("recipe, reconstruction",
                         [("tamp_2of4", "wanda"), ("tamp_sparsegpt_2of4", "sparsegpt")])
def test_2of4_recipe(tiny, tmp_path, recipe, reconstruction):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 3, seed=14)
    run_oneshot(model, tokenizer, data, str(RECIPES / f"{recipe}.yaml"), output_dir=tmp_path / "s")
    for name, module in language_linears(model).items():
        groups = (module.weight == 0).reshape(module.weight.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name
    report = load_report(tmp_path / "s")["amia"]
    assert report["mask_structure"] == "2:4" and report["reconstruction"] == reconstruction


def test_random_selection_is_seeded(tiny):
    masks = []
    for seed in (5, 5, 6):
        model, tokenizer, _ = tiny("llava")
        data = make_calibration_dataset(model, 3, seed=15, text_tokens=80)
        run_oneshot(model, tokenizer, data, [amia(sparsity=0.5, token_selection="random", random_tokens=20,
                                                  seed=seed)])
        masks.append({n: m.weight == 0 for n, m in language_linears(model).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


def test_bfloat16_model(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava", dtype=torch.bfloat16)
    data = make_calibration_dataset(model, 3, seed=16)
    data = data.map(lambda row: {"pixel_values": row["pixel_values"].to(torch.bfloat16)})
    data.set_format("torch")
    recipe = [DiversityAwareSparsity(), amia(sparsity=0.5)]
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "h")
    das = load_report(tmp_path / "h")["das"]["layers"]
    for name, module in language_linears(model).items():
        assert module.weight.dtype == torch.bfloat16
        assert zero_fraction(module) == pytest.approx(das[name]["assigned"], abs=1e-9), name


def test_no_attention_weights_is_a_clear_error(tiny):
    model, tokenizer, _ = tiny("llava")
    attn = model.model.language_model.layers[0].self_attn
    attn.register_forward_hook(lambda module, args, out: (out[0], None))  # as sdpa/flash return
    data = make_calibration_dataset(model, 2, seed=17)
    with pytest.raises(ValueError, match="returned no attention weights.*eager"):
        run_oneshot(model, tokenizer, data, [amia(sparsity=0.5)])


def test_das_with_n_m_amia_is_refused(tiny):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 2, seed=18)
    with pytest.raises(ValueError, match="N:M pattern"):
        run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(), amia(mask_structure="2:4")])
