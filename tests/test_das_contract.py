"""The one contract between DiversityAwareSparsity and the pruner after it (``LayerRatioPruner``)."""

from __future__ import annotations

import pytest
import torch
from conftest import language_linears, run_oneshot, zero_fraction
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from pydantic import PrivateAttr

from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity, load_report
from tamp_modifier.modifiers.pattern_check import PatternCheckingStep
from tamp_modifier.modifiers.ratio_handover import (
    LayerRatioPruner,
    SparsityListPruner,
    as_layer_ratio_pruner,
    following_pruner,
    pruned_by_targets,
)
from tamp_modifier.report.sections import das_section
from tamp_modifier.testing.synthetic import make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE


class NamedRatioWanda(WandaPruningModifier):
    """Wanda taking DAS's ratios by module name: a LayerRatioPruner of its own, not AMIA."""

    _ratios: dict[str, float] = PrivateAttr(default_factory=dict)

    @property
    def pruning_step(self):
        return self

    @property
    def scope(self):
        return None

    @property
    def data_parallel(self) -> bool:
        return False

    def pruned_modules(self, model):
        return list(pruned_by_targets(model, self.targets, self.ignore))

    def set_layer_ratios(self, model, allocated, assigned):
        self._ratios = dict(assigned)
        return dict(assigned)

    def restore(self):
        pass

    def on_calibration_start(self, state, event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        for module, name in self._module_names.items():
            self._module_sparsities[module] = self._ratios[name.rstrip(".")] + 1e-7  # Wanda truncates


def test_amia_is_a_layer_ratio_pruner_and_llm_compressors_pruners_are_wrapped():
    amia = AdaptiveInputActivation(sparsity=0.5)
    assert isinstance(amia, LayerRatioPruner)
    assert as_layer_ratio_pruner(amia) is amia
    for step in (WandaPruningModifier(sparsity=0.5), SparseGPTModifier(sparsity=0.5)):
        assert not isinstance(step, LayerRatioPruner)
        wrapped = as_layer_ratio_pruner(step)
        assert isinstance(wrapped, SparsityListPruner) and isinstance(wrapped, LayerRatioPruner)
        assert wrapped.pruning_step is step and not wrapped.data_parallel and wrapped.scope is None
    assert as_layer_ratio_pruner(QuantizationModifier(targets="Linear", scheme="W8A8")) is None


def test_following_pruner_is_the_first_pruning_step_after_das():
    das, quant = DiversityAwareSparsity(), QuantizationModifier(targets="Linear", scheme="W8A8")
    wanda, amia = WandaPruningModifier(sparsity=0.5), AdaptiveInputActivation(sparsity=0.5)
    assert following_pruner([das, quant, wanda, amia], das).pruning_step is wanda
    assert following_pruner([das, amia, wanda], das) is amia
    assert following_pruner([wanda, das], das) is None


def test_our_steps_are_found_by_protocol_not_by_name():
    das, amia = DiversityAwareSparsity(), AdaptiveInputActivation(sparsity=0.5)
    assert isinstance(das, PatternCheckingStep) and isinstance(amia, PatternCheckingStep)
    assert das.pruning_step is None and amia.pruning_step is amia
    assert not isinstance(WandaPruningModifier(sparsity=0.5), PatternCheckingStep)
    assert not isinstance(NamedRatioWanda(sparsity=0.5), PatternCheckingStep)  # a pruner, not ours


def test_sparsity_list_pruner_writes_the_list_and_restores_the_float(tiny):
    model, _, _ = tiny("llava")
    wanda = WandaPruningModifier(sparsity=0.5, targets=["Linear"], ignore=TOWER_IGNORE)
    pruner = SparsityListPruner(wanda)
    names = pruner.pruned_modules(model)
    assert names == list(language_linears(model))
    ratios = {n: 0.25 if i % 2 else 0.75 for i, n in enumerate(names)}
    given = pruner.set_layer_ratios(model, ratios, ratios)
    assert given == ratios
    # One value per Linear the targets match, ignored ones included (unused there).
    assert len(wanda.sparsity) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert sorted(set(wanda.sparsity)) == sorted({0.5, 0.25 + 1e-7, 0.75 + 1e-7})  # 0.5: ignored targets
    pruner.restore()
    assert wanda.sparsity == 0.5


def test_a_pruner_of_its_own_takes_das_ratios_through_the_contract(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 6, seed=1)
    pruner = NamedRatioWanda(sparsity=0.5, targets=["Linear"], ignore=TOWER_IGNORE)
    das = DiversityAwareSparsity()
    run_oneshot(model, tokenizer, data, [das, pruner], output_dir=tmp_path / "out")
    assert das.pruner is pruner and das.pruning_step is pruner
    report = load_report(tmp_path / "out")
    assert report["das"]["pruner"] == "NamedRatioWanda"
    layers = report["das"]["layers"]
    for name, module in language_linears(model).items():
        assert zero_fraction(module) == pytest.approx(layers[name]["assigned"], abs=1e-9), name
    assert len({round(v["assigned"], 6) for v in layers.values()}) > 1
    assert report["pattern"]["pruned_by"] == "NamedRatioWanda" and report["pattern"]["intact"]


def test_das_section_weights_the_global_ratios_by_size():
    section = das_section(
        {"sparsity": 0.5}, tokens=None, samples=3, ranks=1, pruner="WandaPruningModifier",
        blocks={"a": "b0", "b": "b1"}, sizes={"a": 100, "b": 300}, columns={"a": 10, "b": 30},
        layers={"a": {"score": 1.0, "terms": {}}, "b": {"score": 2.0, "terms": {}}},
        allocated={"a": 0.2, "b": 0.6}, assigned={"a": 0.2, "b": 0.6},
    )
    assert section["method"] == "DiversityAwareSparsity" and section["sparsity"] == 0.5
    assert section["global"]["assigned"] == pytest.approx(0.5)
    assert list(section["layers"]) == ["a", "b"]
    assert section["layers"]["b"] == {"block": "b1", "num_weights": 300, "columns": 30, "score": 2.0,
                                      "terms": {}, "allocated": 0.6, "assigned": 0.6}
