"""``tamp-prune``: run a recipe on a model folder with a calibration set.

    tamp-prune MODEL_DIR --dataset CALIB_DIR --recipe tamp --output OUT_DIR
    tamp-prune            # the demo: prune the shipped demo model, evaluate dense and pruned

The result is written to a temporary folder beside OUT_DIR and moved into place
only when the whole run succeeded, so a failed run never leaves a half-written
checkpoint where a good one is expected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import yaml

from tamp_modifier.cli.arguments import DEMO_OUTPUT, check_recipe_name, parser

_parser = parser  # the benchmarks build the demo's arguments with it


def _shipped_recipes() -> dict[str, Path]:
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in files("tamp_modifier.recipes").iterdir()
            if p.name.endswith(".yaml")}


def resolve_recipe(recipe: str) -> Path:
    """A recipe file path, or a shipped recipe's name; checked for a readable shape."""
    check_recipe_name(recipe)
    path = Path(recipe)
    if not path.is_file():
        path = _shipped_recipes()[recipe]
    content = yaml.safe_load(path.read_text())
    # llm-compressor silently ignores any other shape and then does nothing.
    stages = {k: v for k, v in (content or {}).items() if k.endswith("_stage") and isinstance(v, dict)}
    if not any(k.endswith("_modifiers") for v in stages.values() for k in v):
        raise SystemExit(
            f"tamp-prune: {path} has no `<name>_stage:` with `<name>_modifiers:` inside; "
            "llm-compressor would read nothing from it. See recipes/das_wanda.yaml."
        )
    return path


def check_recipe(recipe: Path, model_folder: str | None) -> None:
    """The recipe parsed as oneshot will parse it, and checked against the model's
    config.json, before anything is loaded; a problem stops with one line."""
    import tamp_modifier  # noqa: F401  (registers the modifiers for the recipe parser)
    from tamp_modifier.cli.recipe_check import group_size_problem, recipe_problem

    problem, parsed = recipe_problem(recipe)
    if problem is None:
        if model_folder is None:
            from tamp_modifier.demo.model import demo_model_path

            model_folder = demo_model_path()
        config = json.loads((Path(model_folder) / "config.json").read_text())
        problem = group_size_problem(parsed, config, recipe.stem)
    if problem:
        raise SystemExit(f"tamp-prune: {problem}")


def _auto_model_classes() -> tuple:
    """The Auto classes a model folder is loaded with, in order: a vision-language model, a
    multimodal LM transformers files elsewhere (Qwen2-Audio), else a text-only one."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM

    return AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForCausalLM


def check_placement(model_folder: str) -> None:
    """The text decoder placed from the model's structure, on an empty (meta-device) model
    built from its config: a model whose decoder cannot be placed stops here, before its
    weights are read."""
    import torch
    from transformers import AutoConfig

    from tamp_modifier.text_decoder import find_text_decoder

    config = AutoConfig.from_pretrained(model_folder)
    skeleton = None
    for auto in _auto_model_classes():
        try:
            with torch.device("meta"):
                skeleton = auto.from_config(config)
            break
        except Exception:  # noqa: BLE001  (a best-effort early check: any failure defers it)
            continue
    if skeleton is None:
        return  # not buildable empty; the loaded model is placed (and refused) before calibrating
    try:
        find_text_decoder(skeleton)
    except ValueError as error:
        raise SystemExit(f"tamp-prune: {error}") from None


def _load_model(folder: str):
    *first, last = _auto_model_classes()
    for auto in first:
        try:
            return auto.from_pretrained(folder, dtype="auto")
        except ValueError:  # "Unrecognized configuration class": not this kind of model
            continue
    return last.from_pretrained(folder, dtype="auto")


# What a processor is saved as (transformers 5 and earlier layouts); a checkpoint
# without them cannot be served (vLLM builds its inputs from them).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.jinja", "chat_template.json")


def _load_processor(folder: str):
    from loguru import logger
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, ImportError) as error:
        found = [n for n in PROCESSOR_FILES if (Path(folder) / n).is_file()]
        logger.warning(
            f"tamp-prune: AutoProcessor cannot load {folder} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:160]}); calibrating with its tokenizer. "
            + (f"Its processor files ({', '.join(found)}) are copied to the output unchanged."
               if found else "It has no processor files, so the output will have none either.")
        )
        return AutoTokenizer.from_pretrained(folder)


def _copy_missing_processor_files(source: Path, staging: Path) -> list[str]:
    """Processor files of the input folder that the save did not write, copied as they are."""
    copied = []
    for name in PROCESSOR_FILES:
        if (source / name).is_file() and not (staging / name).exists():
            shutil.copy2(source / name, staging / name)
            copied.append(name)
    return copied


def _demo_inputs(args: argparse.Namespace):
    """The shipped demo model, its tokenizer as processor, a calibration set, the eval questions."""
    from tamp_modifier.demo.model import demo_calibration_set, load_demo_model
    from tamp_modifier.demo.tasks import make_split

    model, tokenizer = load_demo_model()
    dataset = demo_calibration_set(tokenizer, args.num_samples, args.seed)
    return model, tokenizer, dataset, make_split("eval", args.eval_per_family)


def _prune(model, processor, dataset, recipe: Path, args: argparse.Namespace, staging: Path) -> float:
    """``oneshot`` with the offline-safe arguments; returns its wall time."""
    from llmcompressor import oneshot

    import tamp_modifier  # noqa: F401  (registers the modifiers for the recipe parser)
    from tamp_modifier.calibration_data import collate_rows
    from tamp_modifier.text_decoder import text_decoder_layer_class

    targets = args.sequential_targets or [text_decoder_layer_class(model)]
    samples = min(args.num_samples, len(dataset))
    print(f"tamp-prune: {model.name_or_path} ({type(model).__name__}), recipe {recipe}, "
          f"{samples} calibration samples", flush=True)
    start = time.perf_counter()
    oneshot(
        model=model, processor=processor, dataset=dataset, recipe=str(recipe),
        num_calibration_samples=samples, max_seq_length=args.max_seq_length,
        batch_size=args.batch_size, data_collator=collate_rows,
        sequential_targets=targets, output_dir=str(staging),
    )
    return time.perf_counter() - start


def _write_demo_evaluation(model, staging: Path, args, recipe: Path, dense, pruned, fidelity,
                           seconds: float) -> str:
    """``demo_evaluation.json`` (accuracies, relative performance, fidelity, method, sparsity, time);
    returns the tables."""
    from tamp_modifier.demo.evaluate import format_accuracy_table, format_fidelity_table, relative_performance
    from tamp_modifier.pruning.sparsity_pattern import pruned_share
    from tamp_modifier.text_decoder import language_linears

    evaluation = {
        "method": recipe.stem,
        "recipe": str(recipe),
        "sparsity": pruned_share(language_linears(model).values()),
        "calibration_samples": args.num_samples,
        "calibration_seed": args.seed,
        "eval_per_family": args.eval_per_family,
        "dense_accuracy": dense,
        "pruned_accuracy": pruned,
        "relative_performance": relative_performance(pruned, dense),
        "fidelity": fidelity,
        "prune_seconds": round(seconds, 2),
    }
    (staging / "demo_evaluation.json").write_text(json.dumps(evaluation, indent=2))
    table = format_accuracy_table(dense, pruned, label=f"{recipe.stem} ({evaluation['sparsity']:.0%} sparse)")
    return (table + "\n\nFidelity to the dense model at the answer (whole vocabulary, means per question):\n"
            + format_fidelity_table(fidelity))


def _evaluate_demo(model, processor, questions) -> tuple[dict, dict, dict]:
    """Dense and pruned accuracy per family, and the pruned model's fidelity to the dense one."""
    from tamp_modifier.demo.evaluate import answer_log_probs, compare_with_dense
    from tamp_modifier.demo.model import load_demo_model

    print(f"tamp-prune: evaluating the pruned and the dense model on {len(questions)} "
          "held-out questions", flush=True)
    pruned = answer_log_probs(model, processor, questions, progress="pruned model")
    dense = answer_log_probs(load_demo_model()[0], processor, questions, progress="dense model")
    return compare_with_dense(dense, pruned, processor, questions)


def _language_model_sparsity(model, staging: Path) -> float:
    """Share of zeros in the language model's Linears, as counted in the saved files when
    ``tamp_report.json`` has that count: after a packed 4-bit (W4A16) save, the in-memory Linears
    of a model loaded from a folder have no ``weight`` left to count (seen with llm-compressor
    0.14; the run then failed after writing, and the output was discarded)."""
    from tamp_modifier.pruning.sparsity_pattern import pruned_share
    from tamp_modifier.report.saved import REPORT_FILE_NAME, load_report
    from tamp_modifier.text_decoder import language_linears

    if (staging / REPORT_FILE_NAME).is_file():
        pattern = load_report(staging / REPORT_FILE_NAME).get("checkpoint", {}).get("pattern")
        if pattern:
            return pattern["sparsity"]["measured"]
    return pruned_share(language_linears(model).values())


def _print_summary(output: Path, seconds: float, sparsity: float, table: str | None) -> None:
    from tamp_modifier.pruning.sparsity_pattern import describe_pattern
    from tamp_modifier.report.saved import REPORT_FILE_NAME, load_report
    from tamp_modifier.report.tables import format_table

    print()
    report = load_report(output / REPORT_FILE_NAME) if (output / REPORT_FILE_NAME).is_file() else {}
    for key in ("das", "amia"):
        if key in report:
            print(f"{report[key]['method']} per-layer sparsity:")
            print(format_table(report[key]))
            print()
    if "checkpoint" in report:
        print(f"Sparsity pattern in the saved weights: {describe_pattern(report['checkpoint']['pattern'])}")
        print()
    if table:
        print("Accuracy per task on held-out questions (relative = pruned / dense x 100):")
        print(table)
        print()
    verb = "pruned" if sparsity > 0 else "calibrated (nothing pruned: a profiling recipe)"
    files = sorted(p.name for p in output.iterdir())
    print(f"tamp-prune: {verb} in {seconds:.1f} s; written to {output}: {', '.join(files)}")


def run(args: argparse.Namespace) -> Path:
    """The whole command, on arguments ``arguments.check_arguments`` accepted."""
    from tamp_modifier.cli.console import library_logs

    with library_logs(args.verbose) as renames:
        return _run(args, renames)


def _run(args: argparse.Namespace, renames: dict[str, str]) -> Path:
    from tamp_modifier.calibration_data import load_calibration_dataset

    demo = args.model is None
    output = Path(args.output or DEMO_OUTPUT).resolve()
    recipe = resolve_recipe(args.recipe)
    check_recipe(recipe, args.model)  # before minutes of loading
    if args.model is not None and not args.sequential_targets:
        check_placement(args.model)
    output.parent.mkdir(parents=True, exist_ok=True)

    table = None
    with tempfile.TemporaryDirectory(prefix=".tamp-", dir=output.parent) as scratch:
        staging = Path(scratch) / "result"
        renames[str(staging)] = str(output)  # log lines name where the files end up
        if demo:
            model, processor, dataset, questions = _demo_inputs(args)
            # Prune first: a bad recipe then fails before any evaluation is spent.
            seconds = _prune(model, processor, dataset, recipe, args, staging)
            dense, pruned, fidelity = _evaluate_demo(model, processor, questions)
            table = _write_demo_evaluation(model, staging, args, recipe, dense, pruned, fidelity, seconds)
            from tamp_modifier.demo.model import demo_model_path

            _copy_missing_processor_files(demo_model_path(), staging)  # the image processor, for vLLM
        else:
            dataset = load_calibration_dataset(args.dataset)
            model, processor = _load_model(args.model), _load_processor(args.model)
            seconds = _prune(model, processor, dataset, recipe, args, staging)
            _copy_missing_processor_files(Path(args.model), staging)
        sparsity = _language_model_sparsity(model, staging)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    _print_summary(output, seconds, sparsity, table)
    return output


def main(argv: list[str] | None = None) -> int:
    """``tamp-prune``; the parsing and the cheap checks are ``arguments.main``'s."""
    from tamp_modifier.cli.arguments import main as tamp_prune_main

    return tamp_prune_main(argv)


if __name__ == "__main__":
    sys.exit(main())
