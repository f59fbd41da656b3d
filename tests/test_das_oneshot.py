"""DiversityAwareSparsity inside llm-compressor's real oneshot, on real model classes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import (
    RECIPES,
    assert_reloads_equal,
    brute_force_scores,
    brute_force_terms,
    language_linears,
    run_oneshot,
    zero_fraction,
)
from transformers import AutoModelForImageTextToText

import tamp_modifier
from tamp_modifier import allocate_sparsity, load_report, reallocate
from tamp_modifier.testing.synthetic import make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE

FAMILIES = ["llava", "qwen2_vl", "llava_next", "qwen2_5_vl"]


def placeholder_ids(model):
    ids = {"image": [model.config.image_token_id]}
    if getattr(model.config, "video_token_id", None) is not None:
        ids["video"] = [model.config.video_token_id]
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_das_wanda_recipe_prunes_each_layer_at_its_ratio(tiny, tmp_path, family):
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 6, seed=1)
    expected_scores = brute_force_scores(model, data, placeholder_ids(model))
    out = tmp_path / "pruned"

    run_oneshot(model, tokenizer, data, str(RECIPES / "das_wanda.yaml"), output_dir=out)

    report = load_report(out)["das"]
    layers = report["layers"]
    assert set(layers) == set(language_linears(model))
    assert report["tokens"]["image"] > report["tokens"]["text"] > 0
    for name, score in expected_scores.items():
        assert layers[name]["score"] == pytest.approx(score, abs=1e-4), name
    sizes = {n: v["num_weights"] for n, v in layers.items()}
    independent = allocate_sparsity(expected_scores, sizes, 0.5, "ecoflap", 0.1)
    for name, module in language_linears(model).items():
        assert layers[name]["allocated"] == pytest.approx(independent[name], abs=2e-3)
        # Wanda prunes a whole number of weights per row: the assigned ratio, exactly.
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=1e-9)
        assert layers[name]["realized"] == pytest.approx(layers[name]["assigned"], abs=1e-9)
    assert len({round(v["assigned"], 6) for v in layers.values()}) > 1  # not uniform
    total = sum(sizes.values())
    realized = sum(zero_fraction(m) * sizes[n] for n, m in language_linears(model).items()) / total
    assert realized == pytest.approx(0.5, abs=0.01)
    assert zero_fraction(model.lm_head) == 0.0

    assert_reloads_equal(model, out)


def test_saved_recipe_reruns_in_a_fresh_process_with_tamp_prune(tiny, tmp_path):
    import subprocess
    import sys

    model, tokenizer, dense = tiny("llava", weights=True)
    data = make_calibration_dataset(model, 4, seed=2)
    data.save_to_disk(tmp_path / "calib")
    first = tmp_path / "first"
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_wanda.yaml"), output_dir=first)
    saved_recipe = (first / "recipe.yaml").read_text()
    assert "DiversityAwareSparsity" in saved_recipe
    assert "sparsity: 0.5" in saved_recipe  # the pruner's field restored, not a list

    second = tmp_path / "second"
    cmd = [sys.executable, "-m", "tamp_modifier.cli.run", str(dense), "--recipe", str(first / "recipe.yaml"),
           "--dataset", str(tmp_path / "calib"), "--output", str(second)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    again = AutoModelForImageTextToText.from_pretrained(second)
    for key, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_a_pruner_without_sparsity_takes_das_target_and_saves_as_written(tiny, tmp_path):
    # WandaPruningModifier(sparsity=None) in a Python recipe: DAS's target is used. The saved
    # recipe leaves the field out as written, not DAS's per-layer list (llm-compressor's own YAML
    # requires Wanda's sparsity, so giving it there is the way to a recipe that re-runs).
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from tamp_modifier import DiversityAwareSparsity

    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 4, seed=2)
    recipe = [DiversityAwareSparsity(sparsity=0.5),
              WandaPruningModifier(sparsity=None, targets=["Linear"], ignore=TOWER_IGNORE)]
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "first")
    layers = load_report(tmp_path / "first")["das"]["layers"]
    for name, module in language_linears(model).items():
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=1e-9), name
    (stage,) = yaml.safe_load((tmp_path / "first" / "recipe.yaml").read_text()).values()
    (modifiers,) = stage.values()
    assert modifiers["WandaPruningModifier"].get("sparsity") is None


def test_sparsegpt_follows_das_ratios(tiny, tmp_path):
    model, tokenizer, _ = tiny("qwen2_vl")
    data = make_calibration_dataset(model, 4, seed=3)
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_sparsegpt.yaml"), output_dir=tmp_path / "o")
    layers = load_report(tmp_path / "o")["das"]["layers"]
    for name, module in language_linears(model).items():
        # SparseGPT picks its mask over blocks of columns, not per row.
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=2e-3), name


def test_profiling_run_prunes_nothing_and_reports(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_calibration_dataset(model, 4, seed=4)
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_profile.yaml"), output_dir=tmp_path / "p")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    das = load_report(tmp_path / "p")["das"]
    assert das["pruner"] is None
    assert all(v["realized"] == 0.0 for v in das["layers"].values())
    assert das["global"]["allocated"] == pytest.approx(0.5, abs=1e-3)


def test_saved_scores_reallocate_without_calibration(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 4, seed=5)
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_profile.yaml"), output_dir=tmp_path / "p")
    ratios = reallocate(tmp_path / "p", sparsity=0.6)
    sizes = {n: v["num_weights"] for n, v in load_report(tmp_path / "p")["das"]["layers"].items()}
    assert sum(ratios[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.6, abs=6e-4)

    # A recipe that reuses the profile prunes at 60% with no DAS calibration pass.
    calls = []
    layer0 = model.model.language_model.layers[0].self_attn.q_proj
    handle = layer0.register_forward_hook(lambda *a: calls.append(1))
    recipe = [
        tamp_modifier.DiversityAwareSparsity(profile=str(tmp_path / "p")),
        __import__("llmcompressor.modifiers.pruning", fromlist=["x"]).WandaPruningModifier(
            sparsity=0.6, targets=["Linear"], ignore=tamp_modifier.text_decoder.TOWER_IGNORE
        ),
    ]
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "q")
    handle.remove()
    assert len(calls) == 2 * len(data)  # Wanda's calibration + propagation passes only
    for name, module in language_linears(model).items():
        assert zero_fraction(module) == pytest.approx(ratios[name], abs=1 / module.weight.shape[1])


def test_block_granularity_with_block_level_pruner_targets(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava", num_layers=3)
    data = make_calibration_dataset(model, 4, seed=6)
    recipe = f"""
sparsity_stage:
  sparsity_modifiers:
    DiversityAwareSparsity:
      granularity: block
      allocation: proportional
      max_delta: 0.2
    WandaPruningModifier:
      sparsity: 0.5
      targets: ["re:.*language_model.layers.\\\\d+$"]
      ignore: {json.dumps(tamp_modifier.text_decoder.TOWER_IGNORE)}
"""
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "b")
    layers = load_report(tmp_path / "b")["das"]["layers"]
    per_block = {}
    for name, module in language_linears(model).items():
        per_block.setdefault(layers[name]["block"], set()).add(round(layers[name]["assigned"], 9))
        one_weight_per_row = 1 / module.weight.shape[1]
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=one_weight_per_row)
    assert len(per_block) == 3 and all(len(v) == 1 for v in per_block.values())
    assert len({v.pop() for v in per_block.values()}) > 1


def test_padding_is_no_token(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 4, seed=7, pad_to=100)
    expected = brute_force_scores(model, data, placeholder_ids(model))
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_profile.yaml"), output_dir=tmp_path / "p",
                batch_size=2)
    das = load_report(tmp_path / "p")["das"]
    assert das["tokens"]["text"] + das["tokens"]["image"] == int(sum(r["attention_mask"].sum() for r in data))
    for name, score in expected.items():
        assert das["layers"][name]["score"] == pytest.approx(score, abs=1e-4), name


def test_all_tokens_diversity_and_user_mapping(tiny, tmp_path):
    model, tokenizer, _ = tiny("qwen2_5_vl")
    data = make_calibration_dataset(model, 3, seed=8)
    image = model.config.image_token_id
    recipe = [tamp_modifier.DiversityAwareSparsity(sparsity=0.5, diversity="all_tokens",
                                                   ignore=tamp_modifier.text_decoder.TOWER_IGNORE)]
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "a")
    das = load_report(tmp_path / "a")["das"]
    assert all(set(v["terms"]) == {"all"} for v in das["layers"].values())
    expected = brute_force_scores(model, data, {})  # one modality: all tokens
    for name, score in expected.items():
        assert das["layers"][name]["score"] == pytest.approx(score, abs=1e-4)

    recipe = [tamp_modifier.DiversityAwareSparsity(sparsity=0.5, modality_token_ids={"picture": [image]},
                                                   ignore=tamp_modifier.text_decoder.TOWER_IGNORE)]
    run_oneshot(model, tokenizer, data, recipe, output_dir=tmp_path / "m")
    das = load_report(tmp_path / "m")["das"]
    assert set(next(iter(das["layers"].values()))["terms"]) == {"text", "picture", "text|picture"}
    expected = brute_force_scores(model, data, {"picture": [image]})
    for name, score in expected.items():
        assert das["layers"][name]["score"] == pytest.approx(score, abs=1e-4)


def test_bfloat16_model_is_scored_in_float32(tiny, tmp_path):
    model, tokenizer, _ = tiny("qwen2_vl", dtype=torch.bfloat16)
    data = make_calibration_dataset(model, 3, seed=9)
    data = data.map(lambda row: {"pixel_values": row["pixel_values"].to(torch.bfloat16)})
    data.set_format("torch")
    expected = brute_force_scores(model, data, placeholder_ids(model))
    run_oneshot(model, tokenizer, data, str(RECIPES / "das_wanda.yaml"), output_dir=tmp_path / "h")
    layers = load_report(tmp_path / "h")["das"]["layers"]
    for name, module in language_linears(model).items():
        assert module.weight.dtype == torch.bfloat16
        assert layers[name]["score"] == pytest.approx(expected[name], abs=1e-3), name
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=1e-9)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_three_modalities_in_one_sample(tiny, tmp_path, family):
    """Text, image and video in every sample: DAS's six terms against brute force, AMIA's
    tokens per modality against the data."""
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 4, seed=2, video=True)
    expected = brute_force_terms(model, data, placeholder_ids(model))
    run_oneshot(model, tokenizer, data, str(RECIPES / "tamp.yaml"), output_dir=tmp_path / "t")
    report = load_report(tmp_path / "t")
    counts = {m: sum(int(torch.isin(row["input_ids"], torch.tensor(ids)).sum()) for row in data)
              for m, ids in placeholder_ids(model).items()}
    assert counts["image"] > 0 and counts["video"] > 0
    assert {k: v for k, v in report["das"]["tokens"].items() if k != "text"} == counts
    terms = {"text", "image", "video", "text|image", "text|video", "image|video"}
    for name, layer in report["das"]["layers"].items():
        assert set(layer["terms"]) == set(expected[name]) == terms, name
        for term, value in expected[name].items():
            assert layer["terms"][term] == pytest.approx(value, abs=1e-4), (name, term)
        assert layer["score"] == pytest.approx(sum(expected[name].values()) / len(terms), abs=1e-4), name
    for name, layer in report["amia"]["layers"].items():
        assert {m: layer["tokens"][m] for m in counts} == counts, name
        assert all(layer["selected"][m] > 0 for m in ("text", "image", "video")), name
