"""Audio-language models through llm-compressor's real oneshot: Qwen2-Audio (audio + text) and
Qwen2.5-Omni's thinker (audio + image + video + text in every sample).

Neither ran through llm-compressor 0.14's sequential pipeline before ``tamp_modifier.modifiers.tracer_mends``
(Qwen2-Audio: a ModelOutput turned into a dict; the Omni thinker: the whole graph erased with
its ``**kwargs``). Checked against brute force: DAS's every intra and cross term from full
distance matrices on plain forward hooks, AMIA's token counts per modality from the rows.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import RECIPES, brute_force_terms, language_linears, run_oneshot, zero_fraction
from llmcompressor.modifiers.pruning import WandaPruningModifier

from tamp_modifier import load_report
from tamp_modifier.testing.synthetic import make_calibration_dataset
from tamp_modifier.text_decoder import find_text_decoder


def placeholder_ids(model) -> dict[str, list[int]]:
    """Each modality's placeholder id, read off the config by its transformers attribute name."""
    found = {}
    for modality in ("image", "video", "audio"):
        value = getattr(model.config, f"{modality}_token_id", None)
        if value is not None:
            found[modality] = [int(value)]
    return found


@pytest.mark.parametrize(("family", "modalities"), [
    ("qwen2_audio", {"audio"}),
    ("qwen2_5_omni", {"audio", "image", "video"}),
])
def test_every_modality_in_one_sample_is_scored_and_selected(tiny, tmp_path, family, modalities):
    model, tokenizer, _ = tiny(family)
    data = make_calibration_dataset(model, 4, seed=3, video=family == "qwen2_5_omni")
    ids = placeholder_ids(model)
    assert set(ids) == modalities
    expected = brute_force_terms(model, data, ids)
    run_oneshot(model, tokenizer, data, str(RECIPES / "tamp.yaml"), output_dir=tmp_path / "t")
    report = load_report(tmp_path / "t")
    counts = {m: sum(int(torch.isin(row["input_ids"], torch.tensor(i)).sum()) for row in data)
              for m, i in ids.items()}
    assert all(counts.values())
    assert {k: v for k, v in report["das"]["tokens"].items() if k != "text"} == counts
    names = ["text", *ids]  # the config's order: image, video, audio
    terms = set(names) | {"|".join(pair) for pair in itertools.combinations(names, 2)}
    for name, layer in report["das"]["layers"].items():
        assert set(layer["terms"]) == set(expected[name]) == terms, name
        for term, value in expected[name].items():
            assert layer["terms"][term] == pytest.approx(value, abs=1e-4), (name, term)
    for name, layer in report["amia"]["layers"].items():
        assert {m: layer["tokens"][m] for m in counts} == counts, name
        assert all(layer["selected"][m] > 0 for m in ("text", *modalities)), name
    assert set(report["das"]["layers"]) == set(language_linears(model))


def test_plain_llm_compressor_wanda_runs_on_qwen2_audio_once_tamp_modifier_is_imported(tiny, tmp_path):
    """The tracing fixes serve llm-compressor's own modifiers too: its Wanda, on the decoder only."""
    model, tokenizer, _ = tiny("qwen2_audio")
    data = make_calibration_dataset(model, 3, seed=4)
    tower = {n: p.detach().clone() for n, p in model.named_parameters() if "audio_tower" in n}
    run_oneshot(model, tokenizer, data,
                [WandaPruningModifier(sparsity=0.5, targets=["re:.*language_model.layers.*_proj$"])])
    for module in language_linears(model).values():
        assert zero_fraction(module) == pytest.approx(0.5, abs=1e-9)
    for name, value in model.named_parameters():
        if name in tower:
            assert torch.equal(value, tower[name]), name


def test_a_full_omni_model_is_refused_naming_its_thinker():
    from transformers import CONFIG_MAPPING, AutoModelForMultimodalLM

    with torch.device("meta"):
        model = AutoModelForMultimodalLM.from_config(CONFIG_MAPPING["qwen2_5_omni"]())
    with pytest.raises(ValueError, match=r"prune its thinker \(Qwen2_5OmniThinkerForConditionalGeneration\)"):
        find_text_decoder(model)
