"""DAS calibrates in one forward pass per decoder layer; the pruner after it keeps two.

Forward calls are counted with plain torch hooks, which llm-compressor does not
silence in its propagation passes, so they see every pass that runs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import brute_force_scores, language_linears, run_oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier

from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
from tamp_modifier.report.sections import attached_report
from tamp_modifier.testing.synthetic import make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE, text_decoder_layer_class

PRUNER = dict(targets=["Linear"], ignore=TOWER_IGNORE)


class ForwardCounter:
    """Calls of every decoder layer, in order, as (layer index, number of tokens)."""

    def __init__(self, model):
        layer_class = text_decoder_layer_class(model)
        layers = [m for m in model.modules() if type(m).__name__ == layer_class]
        self.calls = []
        self.handles = [
            layer.register_forward_hook(lambda _m, args, _o, i=i: self.calls.append(i))
            for i, layer in enumerate(layers)
        ]
        self.num_layers = len(layers)

    def per_layer(self, start=0, stop=None) -> set[int]:
        calls = self.calls[start:stop]
        return {calls.count(i) for i in range(self.num_layers)}


def test_das_alone_runs_each_layer_once_per_sample(tiny):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 5, seed=3)
    expected = brute_force_scores(model, data, {"image": [model.config.image_token_id]})
    counter = ForwardCounter(model)

    run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(sparsity=0.5, ignore=TOWER_IGNORE)])

    assert counter.per_layer() == {5}  # llm-compressor's default would be 10
    layers = attached_report(model)["das"]["layers"]
    for name, score in expected.items():
        assert layers[name]["score"] == pytest.approx(score, abs=1e-4), name
    assert attached_report(model)["das"]["samples"] == 5


def test_the_pruner_after_das_still_propagates_its_pruned_outputs(tiny):
    """TAMP's masks equal AMIA's run alone with DAS's ratios: AMIA saw pruned inputs."""
    model, tokenizer, _ = tiny("llava", seed=4)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_calibration_dataset(model, 4, seed=4)
    counter = ForwardCounter(model)

    run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(),
                                         AdaptiveInputActivation(sparsity=0.5, **PRUNER)])
    assert counter.per_layer() == {4 + 2 * 4}  # DAS once, AMIA calibrates and propagates
    ratios = {n: v["assigned"] for n, v in attached_report(model)["das"]["layers"].items()}
    tamp_masks = {n: m.weight == 0 for n, m in language_linears(model).items()}

    model.load_state_dict(reference)
    model.__dict__.pop("_tamp_report", None)
    amia = AdaptiveInputActivation(sparsity=0.5, **PRUNER)
    amia.set_layer_sparsity(ratios)
    run_oneshot(model, tokenizer, data, [amia])
    for name, module in language_linears(model).items():
        assert torch.equal(module.weight == 0, tamp_masks[name]), name

    # Without propagation (every layer calibrated on dense inputs) the masks differ:
    # the comparison above can tell the two apart.
    model.load_state_dict(reference)
    amia = AdaptiveInputActivation(sparsity=0.5, **PRUNER)
    amia.set_layer_sparsity(ratios)
    run_oneshot(model, tokenizer, data, [amia], propagate_error=False)
    assert any(not torch.equal(m.weight == 0, tamp_masks[n]) for n, m in language_linears(model).items())


def test_profile_samples_scores_the_first_samples_and_the_pruner_uses_all(tiny):
    model, tokenizer, _ = tiny("qwen2_vl", seed=5)
    data = make_calibration_dataset(model, 6, seed=5)
    ids = {"image": [model.config.image_token_id]}
    if getattr(model.config, "video_token_id", None) is not None:
        ids["video"] = [model.config.video_token_id]
    expected = brute_force_scores(model, data.select(range(3)), ids)
    counter = ForwardCounter(model)

    run_oneshot(model, tokenizer, data, [DiversityAwareSparsity(profile_samples=3),
                                         WandaPruningModifier(sparsity=0.5, **PRUNER)])

    das_calls = 3 * counter.num_layers
    assert counter.per_layer(0, das_calls) == {3}
    assert counter.per_layer(das_calls) == {2 * 6}  # Wanda: every sample, two passes
    report = attached_report(model)["das"]
    assert report["samples"] == 3
    for name, score in expected.items():
        assert report["layers"][name]["score"] == pytest.approx(score, abs=1e-4), name


def test_profile_samples_must_be_positive():
    with pytest.raises(ValueError, match="profile_samples must be >= 1"):
        DiversityAwareSparsity(profile_samples=0)
