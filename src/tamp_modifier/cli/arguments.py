"""``tamp-prune``'s command line, parsed and checked before anything heavy is imported.

Importing llm-compressor and torch takes seconds (and warns about the machine),
and this module imports neither, so ``--help`` and every mistake it can see in
the arguments (missing folders, an output that is a file, a recipe that is not
one) answer at once, in one line. The run itself is ``tamp_modifier.cli.run``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = [
    "DEFAULT_RECIPE", "SHIPPED_RECIPES", "check_arguments", "check_recipe_name", "main", "parser",
]

DEMO_OUTPUT = "tamp-demo-out"
DEFAULT_RECIPE = "tamp"
# The files in recipes/ (a test keeps this list equal to them). Listed here so
# that --help lists them without reading the package's data.
SHIPPED_RECIPES = (
    "das_profile", "das_sparsegpt", "das_wanda", "tamp", "tamp_2of4", "tamp_2of4_fp8",
    "tamp_2of4_w4a16", "tamp_2of4_w8a8", "tamp_fp8", "tamp_sparsegpt", "tamp_sparsegpt_2of4",
    "tamp_w4a16", "tamp_w8a8",
)

EXAMPLES = f"""examples:
  tamp-prune
      the demo: prune the shipped demo model with TAMP at 50%, evaluate it and the
      dense model, write ./{DEMO_OUTPUT}
  tamp-prune llava-1.5-7b-hf/ --dataset calib/ --output llava-tamp/
      prune your model (a transformers folder) with the default recipe ({DEFAULT_RECIPE})
  tamp-prune qwen2.5-vl/ --dataset calib/ --output qwen-tamp-fp8/ --recipe tamp_fp8 --num-samples 64
      TAMP, then FP8 quantization, on 64 calibration samples

The calibration set is a folder written by datasets' save_to_disk, one processor output
per row; examples/calibration.py makes one from a folder of images.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tamp-prune",
        description="Prune a multimodal model with an llm-compressor recipe that may use TAMP's\n"
        "modifiers, and save a checkpoint that transformers and vLLM load. With no MODEL, prune\n"
        "the shipped demo vision-language model and compare its accuracy per task before and after.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="folder of a transformers model (omit for the demo); needs --dataset and --output")
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help=f"recipe YAML file, or the name of a shipped recipe: {', '.join(SHIPPED_RECIPES)} "
                   f"(default: {DEFAULT_RECIPE}, DAS + AMIA at 50%%)")
    p.add_argument("--dataset", metavar="DIR",
                   help="calibration set (required with MODEL): a folder saved by datasets' "
                   "save_to_disk whose rows are processor outputs (input_ids [1, L], pixel_values, ...)")
    p.add_argument("--output", metavar="DIR",
                   help=f"where to write the pruned model (required with MODEL; demo: ./{DEMO_OUTPUT})")
    p.add_argument("--num-samples", type=int, default=128, metavar="N",
                   help="calibration samples to use (default: 128, the paper's)")
    p.add_argument("--max-seq-length", type=int, default=4096, metavar="N",
                   help="longest calibration sample in tokens; longer ones are cut (default: 4096)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N",
                   help="calibration samples per forward pass (default: 1; rows of unequal length "
                   "need padding)")
    p.add_argument("--sequential-targets", nargs="+", metavar="CLASS",
                   help="decoder layer class(es) calibrated one at a time (default: the language "
                   "model's decoder layer, e.g. LlamaDecoderLayer)")
    p.add_argument("--eval-per-family", type=int, default=500, metavar="N",
                   help="demo only: evaluation questions per task family (default: 500)")
    p.add_argument("--seed", type=int, default=0, help="demo only: calibration set seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
    p.add_argument("--verbose", action="store_true",
                   help="also show the libraries' warnings that are known noise, and debug tables")
    return p


def _fail(message: str):
    raise SystemExit(f"tamp-prune: {message}")


def _check_dataset(folder: str) -> None:
    path = Path(folder)
    if not path.exists():
        _fail(f"--dataset {folder} does not exist")
    if not path.is_dir():
        _fail(f"--dataset {folder} is a file; give the folder written by datasets' Dataset.save_to_disk")
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        _fail(f"--dataset {folder} is not a saved dataset (no state.json): write it with "
              "datasets' Dataset.save_to_disk, e.g. with examples/calibration.py")


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no import of torch or llm-compressor; raises SystemExit(one line)."""
    for name in ("num_samples", "max_seq_length", "batch_size", "eval_per_family"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.model is not None:
        if not args.dataset or not args.output:
            _fail("with a MODEL, give --dataset DIR and --output DIR too (see tamp-prune --help)")
        model = Path(args.model)
        if not model.exists():
            _fail(f"model folder {args.model} does not exist (models cannot be downloaded by name: "
                  "give a local folder)")
        if not (model / "config.json").is_file():
            _fail(f"{args.model} is not a model folder (no config.json): give the folder "
                  "save_pretrained wrote")
        _check_dataset(args.dataset)
    output = Path(args.output or DEMO_OUTPUT)
    if output.exists() and not output.is_dir():
        _fail(f"--output {output} is a file; give a folder (it is created if missing)")
    if output.is_dir() and any(output.iterdir()) and not args.overwrite:
        _fail(f"{output} exists and is not empty; pass --overwrite to replace it")
    check_recipe_name(args.recipe)


def check_recipe_name(recipe: str) -> None:
    """A recipe file that exists, or a shipped recipe's name (with a did-you-mean)."""
    if Path(recipe).is_file() or recipe in SHIPPED_RECIPES:
        return
    if Path(recipe).suffix in (".yaml", ".yml") or "/" in recipe:
        _fail(f"recipe file {recipe} does not exist")
    import difflib

    close = difflib.get_close_matches(recipe, SHIPPED_RECIPES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    _fail(f"recipe {recipe!r} is neither a file nor a shipped recipe ({', '.join(SHIPPED_RECIPES)}).{hint}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_arguments(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # nothing tokenises in parallel here
    if not args.verbose:
        # llm-compressor warns at import ("No accelerator available!" on a CPU);
        # tamp_modifier.cli.console enables its logger again, behind a noise filter.
        os.environ.setdefault("LLM_COMPRESSOR_LOG_DISABLED", "true")
    from tamp_modifier.cli.run import run  # the heavy imports start here

    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
