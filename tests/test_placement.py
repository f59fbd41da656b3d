"""Structural placement: the text decoder found from the model, towers left dense by any name.

SmolVLM and Idefics3 call their tower ``model.vision_model`` and their projector
``model.connector``, names the shipped ignore patterns do not know: with
name-based placement the recipes pruned both (or crashed). Checked here through
the shipped recipes in oneshot and through ``tamp-prune``: every parameter
outside the decoder layers bit-for-bit unchanged, the decoder at its target,
the checkpoint reloading to the same weights.
"""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.utils import match_named_modules
from conftest import RECIPES, assert_reloads_equal, assert_reloads_to_the_same_logits, run_oneshot
from datasets import Dataset

from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity, load_report
from tamp_modifier.cli.arguments import main as tamp_prune
from tamp_modifier.testing.synthetic import FAMILIES, family_of, make_calibration_dataset
from tamp_modifier.text_decoder import (
    TOWER_IGNORE,
    find_text_decoder,
    language_linears,
    outside_decoder_patterns,
    outside_decoder_roots,
)

DECODERS = {  # family: (decoder module, its layers, the layer class), as transformers 5.17 builds them
    "llava": ("model.language_model", "model.language_model.layers", "LlamaDecoderLayer"),
    "llava_next": ("model.language_model", "model.language_model.layers", "LlamaDecoderLayer"),
    "qwen2_vl": ("model.language_model", "model.language_model.layers", "Qwen2VLDecoderLayer"),
    "qwen2_5_vl": ("model.language_model", "model.language_model.layers", "Qwen2_5_VLDecoderLayer"),
    "smolvlm": ("model.text_model", "model.text_model.layers", "LlamaDecoderLayer"),
    "idefics3": ("model.text_model", "model.text_model.layers", "LlamaDecoderLayer"),
    "gemma3": ("model.language_model", "model.language_model.layers", "Gemma3DecoderLayer"),
    "qwen3_vl": ("model.language_model", "model.language_model.layers", "Qwen3VLTextDecoderLayer"),
    "internvl": ("model.language_model", "model.language_model.layers", "Qwen2DecoderLayer"),
    "mistral3": ("model.language_model", "model.language_model.layers", "MistralDecoderLayer"),
    "llava_onevision": ("model.language_model", "model.language_model.layers", "Qwen2DecoderLayer"),
    "qwen2_audio": ("model.language_model", "model.language_model.layers", "Qwen2DecoderLayer"),
    "qwen2_5_omni": ("model", "model.layers", "Qwen2_5OmniDecoderLayer"),
}
# Beyond the first four: SmolVLM and Idefics3 keep tower and projector under names no shipped
# pattern has (model.vision_model, model.connector); the others under known names, with towers
# (SigLIP, InternViT, Pixtral, Qwen3-VL's) and text models (Gemma 3, Qwen2, Mistral) of their own;
# Qwen2-Audio and Qwen2.5-Omni's thinker an audio tower (and the thinker a vision tower) beside them.
NEW_NAMES = ("smolvlm", "idefics3", "gemma3", "qwen3_vl", "internvl", "mistral3", "llava_onevision",
             "qwen2_audio", "qwen2_5_omni")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_is_found_and_the_patterns_leave_exactly_its_layers(tiny, family):
    model, _, _ = tiny(family)
    decoder = find_text_decoder(model)
    assert (decoder.name, decoder.layers, decoder.layer_class) == DECODERS[family]
    assert decoder.num_layers == model.config.get_text_config().num_hidden_layers
    inside = set(expected_linears(model))  # from the table above, not from the placement
    assert len(inside) == 7 * decoder.num_layers  # q k v o gate up down per layer
    kept = {n for n, m in match_named_modules(model, ["Linear"], outside_decoder_patterns(model))}
    assert kept == inside == set(language_linears(model))


# More families, on an empty (meta-device) model of their default config: placement only.
DEFAULT_CONFIG_DECODERS = {
    "gemma3": ("model.language_model.layers", "Gemma3DecoderLayer", ["model.vision_tower", "lm_head"]),
    "mistral3": ("model.language_model.layers", "MistralDecoderLayer",
                 ["model.vision_tower", "model.multi_modal_projector", "lm_head"]),
    "internvl": ("model.language_model.layers", "Qwen2DecoderLayer",
                 ["model.vision_tower", "model.multi_modal_projector", "lm_head"]),
    "llava_onevision": ("model.language_model.layers", "Qwen2DecoderLayer",
                        ["model.vision_tower", "model.multi_modal_projector", "lm_head"]),
    "qwen3_vl": ("model.language_model.layers", "Qwen3VLTextDecoderLayer", ["model.visual", "lm_head"]),
    "idefics2": ("model.text_model.layers", "MistralDecoderLayer",
                 ["model.vision_model", "model.connector", "lm_head"]),
    # get_decoder() returns a whole Llama4ForCausalLM: its inner text model is the decoder.
    "llama4": ("language_model.model.layers", "Llama4TextDecoderLayer",
               ["vision_model", "multi_modal_projector", "language_model.lm_head"]),
}


@pytest.mark.parametrize("model_type", sorted(DEFAULT_CONFIG_DECODERS))
def test_placement_on_empty_models_of_more_families(model_type):
    from transformers import CONFIG_MAPPING, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(CONFIG_MAPPING[model_type]())
    layers, layer_class, outside = DEFAULT_CONFIG_DECODERS[model_type]
    decoder = find_text_decoder(model)
    assert (decoder.layers, decoder.layer_class) == (layers, layer_class)
    assert outside_decoder_roots(model) == outside


def test_a_model_without_a_placeable_decoder_is_refused_with_the_way_out():
    class TwoStacks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.others = torch.nn.ModuleList([torch.nn.ReLU()])

        def get_decoder(self):
            return self

    for model in (torch.nn.Linear(2, 2), TwoStacks()):
        with pytest.raises(ValueError, match="cannot place the text decoder.*sequential_targets.*ignore"):
            find_text_decoder(model)


def layers_prefix(model) -> str:
    return DECODERS[family_of(model)][1] + "."


def expected_linears(model) -> dict[str, torch.nn.Linear]:
    """The decoder layers' Linears, by the table's prefix (independent of the placement code)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(layers_prefix(model))}


def outside_parameters(model):
    prefix = layers_prefix(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(prefix)}


def assert_only_the_decoder_changed(model, before, sparsity, tolerance=1e-9):
    """Towers, connector, embeddings, head unchanged; each decoder Linear at its ratio.

    ``sparsity``: one ratio, or DAS's per-layer ratios by name.
    """
    after = outside_parameters(model)
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for name, module in expected_linears(model).items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        assert (module.weight == 0).float().mean().item() == pytest.approx(target, abs=tolerance), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", ["tamp", "das_sparsegpt", "tamp_2of4", "tamp_sparsegpt"])
def test_shipped_recipes_leave_towers_and_connectors_dense_whatever_their_names(tiny, tmp_path, family,
                                                                               recipe):
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 4, seed=41)
    before = outside_parameters(model)
    run_oneshot(model, tokenizer, data, str(RECIPES / f"{recipe}.yaml"), output_dir=tmp_path / "o")
    if recipe == "tamp_2of4":
        assert_only_the_decoder_changed(model, before, 0.5)
    else:  # DAS ratios; SparseGPT picks its mask over column blocks
        das = load_report(tmp_path / "o")["das"]["layers"]
        assert set(das) == set(expected_linears(model))
        assert_only_the_decoder_changed(model, before, {n: v["assigned"] for n, v in das.items()},
                                        tolerance=0.01)
    assert_reloads_equal(model, tmp_path / "o")
    amia = load_report(tmp_path / "o").get("amia")
    if amia:  # AMIA read every block's attention and labelled each modality's tokens as such
        for modality in ("image", "audio"):
            placeholder = getattr(model.config, f"{modality}_token_id", None)
            if placeholder is None:
                continue
            count = sum(int((row["input_ids"] == placeholder).sum()) for row in data)
            assert count > 0 and all(v["tokens"][modality] == count for v in amia["layers"].values())
    # The saved recipe spells out what was left dense.
    saved = (tmp_path / "o" / "recipe.yaml").read_text()
    if family in ("smolvlm", "idefics3"):
        assert "model\\.vision_model" in saved and "model\\.connector" in saved


def test_the_saved_recipe_reruns_to_the_same_model(tiny, tmp_path):
    weights = []
    for recipe in (RECIPES / "tamp_2of4_fp8.yaml", tmp_path / "first" / "recipe.yaml"):
        model, tokenizer, _ = tiny("smolvlm", seed=7)
        data = make_calibration_dataset(model, 3, seed=45)
        out = tmp_path / ("first" if not weights else "again")
        run_oneshot(model, tokenizer, data, str(recipe), output_dir=out)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name


@pytest.mark.parametrize("family", NEW_NAMES)
def test_quantization_after_pruning_also_leaves_the_tower_alone(tiny, tmp_path, family):
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 3, seed=44)
    before = outside_parameters(model)
    out = tmp_path / "fp8"
    run_oneshot(model, tokenizer, data, str(RECIPES / "tamp_2of4_fp8.yaml"), output_dir=out)
    quantized = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert quantized == set(expected_linears(model))  # every decoder Linear, nothing else
    after = outside_parameters(model)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert_reloads_to_the_same_logits(model, out, data[0])


def test_scope_targets_prunes_what_the_patterns_say_or_refuses_by_name(tiny):
    model, tokenizer, _ = tiny("smolvlm")
    data = make_calibration_dataset(model, 2, seed=42)
    pruner = dict(sparsity=0.5, targets=["Linear"], ignore=list(TOWER_IGNORE), scope="targets")
    outside = r"Linears outside.*model\.vision_model.*scope: text_decoder"
    with pytest.raises(ValueError, match=r"would score \d+ " + outside):
        run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(scope="targets"),
                                             AdaptiveInputActivation(**pruner)])
    with pytest.raises(ValueError, match=r"would prune \d+ " + outside):
        run_oneshot(model, tokenizer, data, [AdaptiveInputActivation(**pruner)])
    with pytest.raises(ValueError, match="same scope"):
        run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(), AdaptiveInputActivation(**pruner)])


@pytest.mark.parametrize("family", NEW_NAMES)
def test_tamp_prune_on_a_model_with_new_names(tiny, tmp_path, family):
    model, _, folder = tiny(family, weights=True)
    make_calibration_dataset(model, 3, seed=43).save_to_disk(tmp_path / "calib")
    before = outside_parameters(model)
    out = tmp_path / "pruned"
    assert tamp_prune([str(folder), "--dataset", str(tmp_path / "calib"), "--output", str(out),
                       "--num-samples", "3"]) == 0
    reloaded = type(model).from_pretrained(out)
    das = load_report(out)["das"]["layers"]
    assert_only_the_decoder_changed(reloaded, before, {n: v["assigned"] for n, v in das.items()})
    assert load_report(out)["pattern"]["intact"]


def test_tamp_prune_refuses_an_unplaceable_decoder_before_loading(tmp_path, monkeypatch):
    """Mllama mixes self- and cross-attention layers in one list: no single decoder-layer class."""
    from transformers import MllamaConfig

    from tamp_modifier.cli import run as cli

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "_load_model", refuse)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=300, cross_attention_layers=[1], pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                  attention_heads=2, image_size=32, patch_size=8, vision_output_dim=64,
                  intermediate_layers_indices=[0])
    MllamaConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path / "mllama")
    Dataset.from_dict({"input_ids": [[[1, 5, 6]]]}).save_to_disk(tmp_path / "calib")
    with pytest.raises(SystemExit) as stop:
        tamp_prune([str(tmp_path / "mllama"), "--dataset", str(tmp_path / "calib"),
                    "--output", str(tmp_path / "out")])
    message = str(stop.value.code)
    assert message.startswith("tamp-prune: cannot place the text decoder of MllamaForConditionalGeneration")
    assert "--sequential-targets" in message and "ignore" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
