"""Bad input stops early with a message that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import RECIPES, run_oneshot
from llmcompressor.modifiers.pruning import WandaPruningModifier

from tamp_modifier import DiversityAwareSparsity
from tamp_modifier.cli.run import main as tamp_prune
from tamp_modifier.testing.synthetic import make_calibration_dataset
from tamp_modifier.text_decoder import TOWER_IGNORE


def wanda(**kwargs):
    return WandaPruningModifier(**{"sparsity": 0.5, "targets": ["Linear"], "ignore": TOWER_IGNORE, **kwargs})


@pytest.fixture
def llava(tiny):
    model, tokenizer, folder = tiny("llava")
    calls = []
    q_proj = model.model.language_model.layers[0].self_attn.q_proj
    q_proj.register_forward_hook(lambda *a: calls.append(1))
    return model, tokenizer, make_calibration_dataset(model, 3), calls


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=-0.2), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=0.95, max_delta=0.1), "would let a layer lose every weight; lower max_delta"),
        (dict(max_delta=-0.1, sparsity=0.5), "max_delta must be >= 0"),
        (dict(allocation="owl"), "allocation must be one of"),
        (dict(diversity="pairs"), "diversity must be one of"),
        (dict(granularity="head"), "granularity must be one of"),
        (dict(unknown_field=1), "unknown_field"),
    ],
)
def test_bad_fields_fail_when_the_recipe_is_read(fields, message):
    with pytest.raises(ValueError, match=message):
        DiversityAwareSparsity(**fields)


def assert_stops_before_calibration(llava, recipe, message, **kwargs):
    model, tokenizer, data, calls = llava
    with pytest.raises(ValueError, match=message):
        run_oneshot(model, tokenizer, data, recipe, **kwargs)
    assert calls == [], "failed only after calibrating"


def test_following_n_m_pruner_is_refused(llava):
    assert_stops_before_calibration(
        llava, [DiversityAwareSparsity(), wanda(mask_structure="2:4")], "N:M pattern .* cannot apply"
    )


def test_pruner_with_its_own_per_layer_sparsity_is_refused(llava):
    recipe = [DiversityAwareSparsity(), wanda(sparsity=[0.5] * 16)]  # any list is refused
    assert_stops_before_calibration(llava, recipe, "one sparsity value")


def test_two_different_targets_are_refused(llava):
    assert_stops_before_calibration(llava, [DiversityAwareSparsity(sparsity=0.6), wanda()], "give one target")


def test_profiling_run_needs_a_sparsity(llava):
    assert_stops_before_calibration(llava, [DiversityAwareSparsity()], "give it `sparsity`")


def test_targets_matching_nothing(llava):
    recipe = [DiversityAwareSparsity(sparsity=0.5, targets=["re:.*no_such_layer$"])]
    assert_stops_before_calibration(llava, recipe, "match no Linear module")
    recipe = [DiversityAwareSparsity(), wanda(ignore=["re:.*"])]
    assert_stops_before_calibration(llava, recipe, "match nothing to prune")


def test_das_and_pruner_covering_different_layers(llava):
    recipe = [DiversityAwareSparsity(ignore=TOWER_IGNORE + ["re:.*down_proj"]), wanda()]
    assert_stops_before_calibration(llava, recipe, "must cover the same layers")


def test_shared_pipeline_is_refused(llava):
    assert_stops_before_calibration(
        llava, [DiversityAwareSparsity(), wanda()], "pipeline='independent'", pipeline="sequential"
    )


def test_declared_modality_missing_from_data(llava):
    model = llava[0]
    absent = model.config.text_config.vocab_size - 2  # reserved: never in these samples
    mapping = {"image": [model.config.image_token_id], "audio": [absent]}
    recipe = [DiversityAwareSparsity(sparsity=0.5, modality_token_ids=mapping, ignore=TOWER_IGNORE)]
    assert_stops_before_calibration(llava, recipe, r"declares \['audio'\], but no token")


@pytest.mark.parametrize(
    "mapping, message",
    [({"text": [3]}, "must not list 'text'"), ({"image": [7], "video": [7]}, "listed for both"),
     ({"image": []}, "non-empty list")],
)
def test_malformed_modality_mapping(llava, mapping, message):
    recipe = [DiversityAwareSparsity(sparsity=0.5, modality_token_ids=mapping, ignore=TOWER_IGNORE)]
    assert_stops_before_calibration(llava, recipe, message)


def test_non_finite_activations_stop_at_the_first_bad_layer(llava):
    model, tokenizer, data, _ = llava
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    later = []
    model.model.language_model.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: later.append(1))
    recipe = [DiversityAwareSparsity(sparsity=0.5, ignore=TOWER_IGNORE)]
    with pytest.raises(ValueError, match=r"non-finite .*layers\.0\.mlp"):
        run_oneshot(model, tokenizer, data, recipe)
    assert later == []  # stopped before calibrating the next decoder layer


def test_profile_from_missing_or_other_model(llava, tmp_path):
    with pytest.raises(FileNotFoundError, match="no TAMP report"):
        run_oneshot(*llava[:3], [DiversityAwareSparsity(profile=str(tmp_path)), wanda()])
    (tmp_path / "tamp_report.json").write_text('{"das": {"layers": {"model.other.q_proj": {"score": 1}}}}')
    with pytest.raises(ValueError, match="calibrate again without `profile`"):
        run_oneshot(*llava[:3], [DiversityAwareSparsity(profile=str(tmp_path)), wanda()])


def test_cli_refuses_bad_recipe_and_existing_output(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("DiversityAwareSparsity:\n  sparsity: 0.5\n")
    with pytest.raises(SystemExit, match="no `<name>_stage:`"):
        tamp_prune(["--recipe", str(bad), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="neither a file nor a shipped recipe"):
        tamp_prune(["--recipe", "no_such_recipe", "--output", str(tmp_path / "o")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit, match="pass --overwrite"):
        tamp_prune(["--output", str(tmp_path / "full")])
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_failed_run_leaves_no_checkpoint(tmp_path):
    recipe = tmp_path / "nm.yaml"
    recipe.write_text((RECIPES / "das_wanda.yaml").read_text().replace(
        "sparsity: 0.5", 'sparsity: 0.5\n      mask_structure: "2:4"'))
    with pytest.raises(ValueError, match="N:M"):
        tamp_prune(["--recipe", str(recipe), "--output", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nm.yaml"]
