"""tamp-prune's first minute: a fast --help, and one clear line for each bad input, before loading."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPES, run_oneshot

import tamp_modifier.cli.run as cli
from tamp_modifier.cli.arguments import SHIPPED_RECIPES
from tamp_modifier.cli.arguments import main as tamp_prune
from tamp_modifier.demo.model import demo_model_path
from tamp_modifier.report.saved import load_report
from tamp_modifier.testing.synthetic import make_calibration_dataset


def test_help_imports_neither_torch_nor_llmcompressor():
    code = (
        "import sys; import tamp_modifier.cli.arguments as front; text = front.parser().format_help(); "
        "assert 'torch' not in sys.modules and 'llmcompressor' not in sys.modules, sorted(sys.modules); "
        "print(text)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    text = done.stdout
    flat = " ".join(text.split())  # argparse wraps lines wherever the width falls
    assert "default: tamp" in flat and "required with MODEL" in flat and text.count("tamp-prune ") >= 3
    options = text.split("options:", 1)[1]
    for option in ("--max-seq-length", "--batch-size", "--num-samples", "--sequential-targets"):
        assert "default" in options.split(f"  {option}", 1)[1].split("\n  --", 1)[0], option


def test_shipped_recipe_list_is_the_recipes_folder():
    assert sorted(SHIPPED_RECIPES) == sorted(p.stem for p in RECIPES.glob("*.yaml"))


@pytest.fixture
def llava_folder(tiny, tmp_path):
    model, tokenizer, folder = tiny("llava", weights=True)
    data = make_calibration_dataset(model, 3, seed=1)
    data.save_to_disk(tmp_path / "calib")
    return folder, tmp_path / "calib"


@pytest.fixture
def never_load(monkeypatch):
    """Fail the test if the model would be loaded: every check must come first."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(cli, "_load_model", refuse)
    monkeypatch.setattr(cli, "_demo_inputs", refuse)


def one_line_failure(argv) -> str:
    with pytest.raises(SystemExit) as stop:
        tamp_prune(argv)
    message = str(stop.value.code)
    assert message.startswith("tamp-prune: ") and "\n" not in message, message
    return message


def test_bad_paths_stop_with_one_line(tmp_path, llava_folder, never_load):
    model, calib = llava_folder
    out = str(tmp_path / "out")
    assert "does not exist" in one_line_failure(
        [str(tmp_path / "nope"), "--dataset", str(calib), "--output", out]
    )
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_failure(
        [str(tmp_path / "empty"), "--dataset", str(calib), "--output", out]
    )
    assert "give --dataset DIR and --output DIR" in one_line_failure([str(model), "--output", out])
    assert "not a saved dataset" in one_line_failure(
        [str(model), "--dataset", str(tmp_path), "--output", out]
    )
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_failure([str(model), "--dataset", str(tmp_path / "file"), "--output", out])
    assert "--output" in one_line_failure(
        [str(model), "--dataset", str(calib), "--output", str(tmp_path / "file")]
    )
    assert "at least 1" in one_line_failure(["--num-samples", "0", "--output", out])
    assert "Did you mean 'tamp_fp8'" in one_line_failure(["--recipe", "tamp_fp9", "--output", out])


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("DiversityAwareSparsity:", "DiversityAwareSparsty:"), "did you mean 'DiversityAwareSparsity'"),
        (("max_delta: 0.1", "max_delt: 0.1"), "has no field 'max_delt'; did you mean 'max_delta'"),
        (("sparsity: 0.5", "sparsity: 1.5"), "sparsity must be in [0, 1), got 1.5"),
        (("token_selection: amia", "token_selection: amai"), "token_selection"),
    ],
)
def test_recipe_problems_stop_before_the_model_is_loaded(tmp_path, llava_folder, never_load, edit, expected):
    model, calib = llava_folder
    recipe = write_recipe(tmp_path, (RECIPES / "tamp.yaml").read_text().replace(*edit))
    message = one_line_failure(
        [str(model), "--dataset", str(calib), "--output", str(tmp_path / "o"), "--recipe", recipe]
    )
    assert expected in message


def test_w4a16_group_size_is_checked_against_the_model_widths(tmp_path, never_load):
    # A demo-shaped model of width 192 (the first demo's): W4A16's groups of 128 cannot divide it.
    folder = tmp_path / "wide"
    shutil.copytree(demo_model_path(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 192
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as stop:
        cli.check_recipe(RECIPES / "tamp_w4a16.yaml", str(folder))
    message = str(stop.value.code)
    assert message.startswith("tamp-prune: ") and "\n" not in message
    assert "groups of 128" in message and "hidden_size = 192" in message and "group_size 64" in message
    # The shipped demo's widths (128, 384) take groups of 128.
    assert cli.check_recipe(RECIPES / "tamp_w4a16.yaml", None) is None


def test_checkpoint_files_are_readable_by_others(tiny, tmp_path):
    model, tokenizer, _ = tiny("llava")
    data = make_calibration_dataset(model, 2, seed=2)
    old = os.umask(0o022)
    try:
        run_oneshot(model, tokenizer, data, str(RECIPES / "tamp_fp8.yaml"), output_dir=tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    # As save_pretrained's own JSON files (model.safetensors is 0600 straight from
    # transformers' save_pretrained here, without llm-compressor or us: not ours to change).
    assert modes["tamp_report.json"] == modes["config.json"] == modes["tokenizer.json"] == 0o644, modes


def test_report_tables_fit_100_columns():
    from tamp_modifier.report.tables import format_table

    # A 32-layer image-text model's names: the common prefix is printed once, above.
    layers = {
        f"model.language_model.layers.{i}.{m}": {
            "score": 0.5,
            "terms": {"text": 0.1, "image": 0.2, "text|image": 0.3},
            "assigned": 0.5,
            "realized": 0.5,
        }
        for i in range(32)
        for m in ("self_attn.q_proj", "mlp.down_proj")
    }
    table = format_table({"method": "DiversityAwareSparsity", "layers": layers, "global": {"assigned": 0.5}})
    assert max(len(line) for line in table.splitlines()) <= 100
    assert table.startswith("layers under model.language_model.layers.\n")
    assert "\n31.mlp.down_proj " in table
    selection = {
        n: {
            "selected": {"text": 3, "image": 40},
            "sparsity": 0.5,
            "mask_structure": "0:0",
            "share": 0.1,
            "realized": 0.5,
        }
        for n in layers
    }
    table = format_table(
        {
            "method": "AdaptiveInputActivation",
            "layers": selection,
            "selected_share": {"text": 0.2, "image": 0.1},
        }
    )
    assert max(len(line) for line in table.splitlines()) <= 100


def test_readme_own_model_commands_run_as_written(tmp_path):
    """The README's "Your own model" block, line by line, in a fresh folder."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("<!-- own-model -->", 1)[1].split("<!-- /own-model -->", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 3
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        command = command.replace("examples/", f"{root}/examples/")
        done = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    out = tmp_path / "my-model-tamp"
    files = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "recipe.yaml",
        "tamp_report.json",
        "chat_template.jinja",
        "processor_config.json",
        "tokenizer.json",
    } <= files
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tamp_modifier.pruning.sparsity_pattern import pruned_share
    from tamp_modifier.text_decoder import language_linears

    model = AutoModelForImageTextToText.from_pretrained(out)
    AutoProcessor.from_pretrained(out)  # servable: the processor came along
    assert pruned_share(language_linears(model).values()) == pytest.approx(0.5, abs=0.01)
    assert "tamp-prune: pruned in" in done.stdout and str(out) in done.stdout


def test_a_processor_that_cannot_load_is_said_and_its_files_kept(tmp_path, llava_folder, capsys):
    model, calib = llava_folder  # config, weights and tokenizer: no processor yet
    broken = {"image_processor_type": "NoSuchImageProcessor", "size": {"shortest_edge": 32}}
    (model / "preprocessor_config.json").write_text(__import__("json").dumps(broken))
    (model / "chat_template.jinja").write_text("{{ messages }}")
    out = tmp_path / "out"
    assert (
        tamp_prune([str(model), "--dataset", str(calib), "--output", str(out), "--recipe", "das_wanda"]) == 0
    )
    printed = capsys.readouterr().out
    assert "AutoProcessor cannot load" in printed and "copied to the output unchanged" in printed
    for name in ("preprocessor_config.json", "chat_template.jinja"):
        assert (out / name).read_text() == (model / name).read_text(), name


def test_own_model_with_w4a16_is_written_and_its_sparsity_counted_in_the_files(tiny, tmp_path, capsys):
    # After a packed 4-bit save llm-compressor leaves the in-memory Linears without `weight`;
    # the summary's sparsity comes from the saved files, and the run completes.
    model, _, folder = tiny("llava", weights=True, hidden_size=128, intermediate_size=256)
    make_calibration_dataset(model, 3, seed=1).save_to_disk(tmp_path / "calib")
    out = tmp_path / "w4a16"
    assert tamp_prune([str(folder), "--dataset", str(tmp_path / "calib"), "--recipe", "tamp_w4a16",
                       "--output", str(out), "--num-samples", "3"]) == 0
    pattern = load_report(out)["checkpoint"]["pattern"]
    assert pattern["sparsity"]["measured"] == pytest.approx(0.5, abs=0.01)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("tamp-prune: pruned in")
