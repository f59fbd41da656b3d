"""Pruned + quantized checkpoints: the pattern in the saved tensors, the ignore list
under both namings, reload in transformers, and the warning when a step breaks the pattern."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, assert_reloads_to_the_same_logits, run_oneshot
from loguru import logger
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from tamp_modifier.deploy.checkpoint import finalize_checkpoint, strip_sparsity_config
from tamp_modifier.report.saved import load_report
from tamp_modifier.testing.synthetic import make_calibration_dataset

_CHECKER = Path(__file__).resolve().parents[1] / "scripts" / "check_quantization_config.py"


def config_problems(folder) -> list[str]:
    """scripts/check_quantization_config.py, run with this environment's compressed-tensors.

    The same script runs under compressed-tensors 0.17.0 (vLLM's) in its own
    environment via scripts/check_ct017.sh; here it guards the script itself.
    """
    spec = importlib.util.spec_from_file_location("check_quantization_config", _CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check(Path(folder))


QUANT_RECIPES = ["tamp_fp8", "tamp_w8a8", "tamp_w4a16", "tamp_2of4_fp8", "tamp_2of4_w8a8", "tamp_2of4_w4a16"]


@pytest.fixture
def warnings():
    seen = []
    handle = logger.add(lambda message: seen.append(str(message)), level="WARNING")
    yield seen
    logger.remove(handle)


def loaded(tiny, family, **kwargs):
    """A tiny model as users have it: loaded from a checkpoint with from_pretrained.

    Loading records transformers 5's renaming (checkpoint ``language_model.model.*``
    -> ``model.language_model.*``), which compressed-tensors then applies to the
    ignore list; a model built from a config does not go through it.
    """
    _, tokenizer, folder = tiny(family, weights=True, **kwargs)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    return model, tokenizer


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def zero_mask(tensors, prefix) -> torch.Tensor:
    """Which weights of a saved module are exactly zero, read straight off the file.

    Plain, FP8 and INT8 storage compare with 0; 4-bit weights are 8 nibbles per
    int32, lowest bits first, stored as value + 8 (symmetric), so a zero is 8.
    """
    if prefix + ".weight_packed" in tensors:
        packed = tensors[prefix + ".weight_packed"].to(torch.int64) & 0xFFFFFFFF
        rows, cols = tensors[prefix + ".weight_shape"].tolist()
        nibbles = torch.stack([(packed >> (4 * k)) & 0xF for k in range(8)], dim=-1)
        return (nibbles.reshape(rows, -1)[:, :cols] == 8)
    return tensors[prefix + ".weight"].to(torch.float32) == 0


def quantized_prefixes(tensors) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")}


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_quantized_checkpoint_reloads_in_transformers_equal_to_memory(tiny, tmp_path, family):
    model, tokenizer = loaded(tiny, family)
    dataset = make_calibration_dataset(model, 4)
    out = tmp_path / "pruned-fp8"
    run_oneshot(model, tokenizer, dataset, str(RECIPES / "tamp_2of4_fp8.yaml"), output_dir=out)

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert not config.get("sparsity_config")  # vLLM 0.33 raises on a non-empty one
    tensors = saved_tensors(out)
    quantized = quantized_prefixes(tensors)
    saved_linears = {k.removesuffix(".weight") for k, v in tensors.items()
                     if k.endswith(".weight") and v.dim() == 2}
    kept_dense = {p for p in saved_linears - quantized if "embed" not in p}
    model_dense = {n for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not hasattr(m, "quantization_scheme")}
    assert kept_dense and model_dense
    # Both namings: the checkpoint's (what vLLM reads) and transformers 5's.
    assert kept_dense <= set(config["ignore"])
    assert model_dense <= set(config["ignore"])
    assert not quantized & set(config["ignore"])
    assert config_problems(out) == []

    assert_reloads_to_the_same_logits(model, out, dataset[0])


@pytest.mark.parametrize("recipe", QUANT_RECIPES)
def test_quant_recipes_keep_the_pattern_in_the_saved_tensors(tiny, tmp_path, recipe, warnings):
    # Width 128 so the 4-bit recipes' groups of 128 columns divide every Linear.
    model, tokenizer = loaded(tiny, "llava", hidden_size=128, intermediate_size=256)
    dataset = make_calibration_dataset(model, 4)
    out = tmp_path / recipe
    run_oneshot(model, tokenizer, dataset, str(RECIPES / f"{recipe}.yaml"), output_dir=out)

    report = load_report(out)
    pattern = report["checkpoint"]["pattern"]
    assert pattern["intact"] and report["pattern"]["intact"]
    assert report["pattern"]["steps_after"] == ["QuantizationModifier"]
    tensors = saved_tensors(out)
    quantized = quantized_prefixes(tensors)
    section = report["amia"]["layers"]
    assert len(section) == len(quantized) == 14
    structured = "2of4" in recipe
    for prefix in quantized:
        zeros = zero_mask(tensors, prefix)
        name = next(n for n in section if n.endswith(prefix.split("model.", 1)[-1]))
        layer = pattern["layers"][name]
        assert layer["measured"] == pytest.approx(zeros.float().mean().item())
        # Rounding can only add zeros (tiny weights to 0), never remove the pruned ones.
        assert zeros.float().mean().item() >= layer["expected"]
        if structured:
            assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) >= 2).all()
    assert not [w for w in warnings if "pattern" in w]


def test_gptq_after_pruning_is_named_with_what_survived(tiny, tmp_path, warnings):
    model, tokenizer = loaded(tiny, "llava")
    dataset = make_calibration_dataset(model, 4)
    recipe = (RECIPES / "tamp_2of4_w8a8.yaml").read_text().replace("QuantizationModifier:", "GPTQModifier:")
    out = tmp_path / "gptq"
    run_oneshot(model, tokenizer, dataset, recipe, output_dir=out)

    early = [w for w in warnings if "will not keep the sparsity pattern" in w]
    assert early and "GPTQModifier" in early[0]
    late = [w for w in warnings if "broke the sparsity pattern" in w]
    assert late and "the step after AdaptiveInputActivation, GPTQModifier," in late[0]
    report = load_report(out)
    assert not report["pattern"]["intact"] and not report["checkpoint"]["pattern"]["intact"]
    tensors = saved_tensors(out)
    groups = torch.cat([zero_mask(tensors, p).reshape(-1, 4).sum(-1) >= 2
                        for p in quantized_prefixes(tensors)])
    assert report["checkpoint"]["pattern"]["nm_share"] == pytest.approx(groups.float().mean().item())
    assert report["checkpoint"]["pattern"]["nm_share"] < 1.0
    assert f"{report['checkpoint']['pattern']['nm_share']:.2%}" in late[0]


def test_pruned_only_checkpoint_is_plain_dense_with_the_pattern_beside_it(tiny, tmp_path):
    model, tokenizer = loaded(tiny, "qwen2_vl")
    dataset = make_calibration_dataset(model, 4)
    out = tmp_path / "pruned"
    run_oneshot(model, tokenizer, dataset, str(RECIPES / "tamp_2of4.yaml"), output_dir=out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    pattern = load_report(out)["checkpoint"]["pattern"]
    assert pattern["intact"] and pattern["nm_share"] == 1.0 and pattern["sparsity"]["measured"] == 0.5


def test_a_non_empty_sparsity_config_never_stays(tiny, tmp_path):
    model, _, folder = tiny("llava")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "ignore": ["language_model.lm_head", "re:.*vision_tower.*"],
        "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    changes = finalize_checkpoint(model, folder)
    written = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert written["sparsity_config"] == {}
    assert changes["sparsity_config_removed"]["sparsity_structure"] == "2:4"
    assert written["ignore"] == ["language_model.lm_head", "lm_head", "re:.*vision_tower.*"]
    assert strip_sparsity_config({"quantization_config": {"sparsity_config": {}}}) is None


def test_config_check_names_what_vllm_would_refuse(tiny, tmp_path):
    model, tokenizer = loaded(tiny, "llava")
    out = tmp_path / "fp8"
    run_oneshot(model, tokenizer, make_calibration_dataset(model, 2), str(RECIPES / "tamp_2of4_fp8.yaml"),
                output_dir=out)
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    quantization["sparsity_config"] = {"format": "sparse-24-bitmask"}
    quantization["ignore"] = [n for n in quantization["ignore"] if "lm_head" not in n]
    (out / "config.json").write_text(json.dumps(config))
    problems = config_problems(out)
    assert any("sparsity_config is not empty" in p for p in problems)
    assert any(p.startswith("language_model.lm_head is not quantized") for p in problems)
