"""What vLLM needs in a checkpoint beside the weights' values: the hub's (vLLM's) weight names,
an ignore list in those names, and the demo's processor files reproducing its own inputs.

vLLM itself runs in its own environment (scripts/vllm_check.py, run by .ci/run); these tests
check, in the project's environment, the files it reads.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

from tamp_modifier.demo.model import demo_model_path, encode_prompt, load_demo_model, pixel_values
from tamp_modifier.demo.tasks import FAMILIES, make_split
from tamp_modifier.deploy.checkpoint import checkpoint_names, finalize_checkpoint, ignore_both_namings
from tamp_modifier.testing.synthetic import build_tiny_model


def saved_keys(folder) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(("family", "max_shard_size"), [("llava", None), ("llava", "40KB"), ("llava_next", None)])
def test_clip_tower_is_saved_under_the_hub_names_and_reloads_equal(tmp_path, family, max_shard_size):
    # Built from a config, as the demo was: transformers 5.17 saves the CLIP tower without the
    # `vision_model` prefix, a name vLLM cannot load.
    model = build_tiny_model(family).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path / "a", **kwargs)
    before = saved_keys(tmp_path / "a")
    assert any(k.startswith("vision_tower.encoder.") for k in before)

    changes = finalize_checkpoint(model, tmp_path / "a")
    after = saved_keys(tmp_path / "a")
    tower = {k for k in after if k.startswith("vision_tower.")}
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert len(after) == len(before) and changes["weights_renamed"] == len(tower)
    if max_shard_size:  # the shard index names the same tensors as the files hold
        index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
        assert len(list((tmp_path / "a").glob("*.safetensors"))) > 1
        assert set(index["weight_map"]) == after
    # checkpoint_names gives the names the files now have.
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {f"{v}.weight" for v in checkpoint_names(model, linears).values()} <= after

    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "a").eval()
    assert_same_weights(reloaded, model)
    # Loaded from the hub's names, transformers saves them back itself: nothing to rename,
    # and no prefix put in twice.
    reloaded.save_pretrained(tmp_path / "b")
    assert saved_keys(tmp_path / "b") == after
    assert finalize_checkpoint(reloaded, tmp_path / "b")["weights_renamed"] == 0
    assert saved_keys(tmp_path / "b") == after


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_towers_are_saved_under_the_hub_names_already(tmp_path, family):
    # Qwen2-VL's tower is no CLIP: transformers saves the hub's `visual.*`, `model.layers.*`,
    # `lm_head.*`, which vLLM's Qwen2-VL weight mapper reads; nothing to rename.
    model = build_tiny_model(family).eval()
    model.save_pretrained(tmp_path)
    before = saved_keys(tmp_path)
    assert finalize_checkpoint(model, tmp_path)["weights_renamed"] == 0 and saved_keys(tmp_path) == before
    assert {k.split(".")[0] for k in before} == {"visual", "model", "lm_head"}


def test_ignore_entries_in_the_dropped_naming_become_the_files_names():
    model = build_tiny_model("llava")
    module = "model.vision_tower.encoder.layers.0.mlp.fc1"
    assert ignore_both_namings(["vision_tower.encoder.layers.0.mlp.fc1", "re:.*lm_head"], model) == [
        module, "vision_tower.vision_model.encoder.layers.0.mlp.fc1", "re:.*lm_head"]
    assert ignore_both_namings([module], model) == [module, "vision_tower.vision_model.encoder.layers.0.mlp.fc1"]
    language = "model.language_model.layers.0.mlp.up_proj"
    assert ignore_both_namings([language], model) == [language, "language_model.model.layers.0.mlp.up_proj"]


def test_shipped_demo_weights_have_the_hub_names():
    keys = saved_keys(demo_model_path())
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


def test_demo_processor_builds_exactly_the_demo_inputs_from_a_chat():
    # What vLLM does with a chat request: the chat template, then the processor on text and image.
    processor = AutoProcessor.from_pretrained(demo_model_path())
    _, tokenizer = load_demo_model()
    questions = make_split("eval", 4)
    assert {q.family for q in questions} == set(FAMILIES)
    for q in questions:
        content = ([{"type": "image"}] if q.image is not None else []) + [{"type": "text", "text": q.prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=text, images=[q.image] if q.image is not None else None, return_tensors="pt",
                           add_special_tokens=False)
        assert inputs["input_ids"][0].tolist() == encode_prompt(q, tokenizer), q.prompt
        if q.image is not None:
            torch.testing.assert_close(inputs["pixel_values"], pixel_values([q.image]), rtol=0, atol=1e-6)


def test_demo_checkpoints_carry_the_processor_files(tmp_path):
    from tamp_modifier.cli.run import main as tamp_prune

    out = tmp_path / "out"
    assert tamp_prune(["--output", str(out), "--num-samples", "8", "--eval-per-family", "4"]) == 0
    for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "LlavaProcessor"
    tower = [k for k in saved_keys(out) if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)


def test_fused_layers_vllm_builds_from_ignored_ones_are_named_too():
    # vLLM fuses q/k/v (and gate/up) into one layer and, for a model class without a
    # packed_modules_mapping (vLLM 0.32's LLaVA-OneVision), matches the fused name itself.
    model = build_tiny_model("llava_onevision")
    attn = "vision_tower.vision_model.encoder.layers.0.self_attn"
    shards = [f"{attn}.{p}" for p in ("k_proj", "v_proj", "q_proj")]
    out = ignore_both_namings([*shards, f"{attn}.out_proj"], model)
    assert [n for n in out if n.startswith("vision_tower.")] == [*shards, f"{attn}.qkv_proj",
                                                                   f"{attn}.out_proj"]
    assert "model.vision_tower.encoder.layers.0.self_attn.qkv_proj" in out
    # Not all shards ignored: no fused name (vLLM requires one scheme for all shards).
    assert not any(n.endswith("qkv_proj") for n in ignore_both_namings(shards[:2], model))
    mlp = "model.language_model.layers.0.mlp"
    assert f"{mlp}.gate_up_proj" in ignore_both_namings([f"{mlp}.gate_proj", f"{mlp}.up_proj"], model)
    assert ignore_both_namings(["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], model) == [
        "re:.*q_proj", "re:.*k_proj", "re:.*v_proj"]


def test_quantized_llava_onevision_names_vllms_fused_tower_layers_and_reloads_equal(tiny, tmp_path):
    from conftest import RECIPES, assert_reloads_to_the_same_logits, run_oneshot

    from tamp_modifier.testing.synthetic import make_calibration_dataset

    model, tokenizer, _ = tiny("llava_onevision", weights=True)
    dataset = make_calibration_dataset(model, 4)
    out = tmp_path / "w8a8"
    run_oneshot(model, tokenizer, dataset, str(RECIPES / "tamp_w8a8.yaml"), output_dir=out)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    towers = {n.rsplit(".", 1)[0] for n in ignore if n.startswith("vision_tower.vision_model.encoder.layers.")
              and n.endswith(".v_proj")}
    assert towers and {f"{t}.qkv_proj" for t in towers} <= set(ignore)
    # The language model's Linears are quantized: no fused name of theirs is ignored.
    assert not any("language_model" in n and n.endswith(("qkv_proj", "gate_up_proj")) for n in ignore)
    assert_reloads_to_the_same_logits(model, out, dataset[0])
