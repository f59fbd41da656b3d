"""Masks and reports of DAS, AMIA and TAMP, to compare two versions of the code.

A change meant to keep behaviour (a speed-up, a refactor) must leave every mask,
score and ratio as it was. Run this once on the old version and once on the new
one, then compare the two files:

    git stash; python benchmarks/fingerprint.py --dump /tmp/old.pt; git stash pop
    python benchmarks/fingerprint.py --dump /tmp/new.pt
    python benchmarks/fingerprint.py --compare /tmp/old.pt /tmp/new.pt

Runs, each on a fresh model: the shipped demo model (calibration seed 0) and the
random ~60M-parameter LLaVA of ``benchmarks/speed.py``, with DAS alone
(profiling), DAS + Wanda, AMIA, TAMP (DAS + AMIA) and AMIA 2:4. For each it keeps
every language-model Linear's zero mask, DAS's per-layer score and ratio, and
AMIA's selected-token counts, and the whole attached report with its timings
left out. ``--compare`` prints the number of differing mask
entries and the largest score difference per run, and exits 1 if anything
differs.
"""

from __future__ import annotations

import argparse
import os
import sys

RUNS = ("das", "das+wanda", "amia", "tamp", "amia_2of4")
MODELS = ("demo", "random")
# Tiny models of other families (``--models qwen2_vl gemma3 ...``): their placement and modality
# labels go through code the two defaults do not.
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_omni", "gemma3", "qwen2_audio", "smolvlm")


def recipe(run: str) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
    from tamp_modifier.text_decoder import TOWER_IGNORE

    pruner = dict(targets=["Linear"], ignore=TOWER_IGNORE)
    return {
        "das": lambda: [DiversityAwareSparsity(sparsity=0.5, ignore=TOWER_IGNORE)],
        "das+wanda": lambda: [DiversityAwareSparsity(), WandaPruningModifier(sparsity=0.5, **pruner)],
        "amia": lambda: [AdaptiveInputActivation(sparsity=0.5, **pruner)],
        "tamp": lambda: [DiversityAwareSparsity(), AdaptiveInputActivation(sparsity=0.5, **pruner)],
        "amia_2of4": lambda: [AdaptiveInputActivation(mask_structure="2:4", **pruner)],
    }[run]()


def inputs(name: str, samples: int):
    """A fresh model, its tokenizer and calibration rows."""
    if name == "demo":
        from tamp_modifier.demo.model import demo_calibration_set, load_demo_model

        model, tokenizer = load_demo_model()
        return model, tokenizer, demo_calibration_set(tokenizer, samples, 0), None
    import tempfile

    from tamp_modifier.testing.synthetic import (
        build_random_vlm,
        build_tiny_model,
        make_calibration_dataset,
        save_tiny_model,
    )

    if name in TINY_FAMILIES:
        model = build_tiny_model(name, seed=0)
        folder = tempfile.TemporaryDirectory()
        tokenizer = save_tiny_model(model, folder.name)
        return model, tokenizer, make_calibration_dataset(model, samples, seed=0), folder
    model = build_random_vlm(target_params=int(60e6), seed=0)
    folder = tempfile.TemporaryDirectory()
    tokenizer = save_tiny_model(model, folder.name)
    return model, tokenizer, make_calibration_dataset(model, samples, text_tokens=60, seed=0), folder


def fingerprint(name: str, run: str, samples: int) -> dict:
    import torch
    from llmcompressor import oneshot

    from tamp_modifier.calibration_data import collate_rows
    from tamp_modifier.report.sections import attached_report
    from tamp_modifier.text_decoder import language_linears, text_decoder_layer_class

    model, tokenizer, data, _folder = inputs(name, samples)
    oneshot(
        model=model, processor=tokenizer, dataset=data, recipe=recipe(run),
        num_calibration_samples=len(data), shuffle_calibration_samples=False, max_seq_length=4096,
        data_collator=collate_rows, sequential_targets=[text_decoder_layer_class(model)],
    )
    report = attached_report(model)
    das = report.get("das", {}).get("layers", {})
    amia = report.get("amia", {}).get("layers", {})
    return {
        "masks": {n: (m.weight == 0).cpu() for n, m in language_linears(model).items()},
        "scores": {n: v["score"] for n, v in das.items()},
        "ratios": {n: v["assigned"] for n, v in das.items()},
        "selected": {n: v["selected"] for n, v in amia.items()},
        "report": without_timings(report),
        "torch_threads": torch.get_num_threads(),
    }


def without_timings(value):
    """A deep copy of a report without its wall-clock figures, which differ between runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def compare(old_path: str, new_path: str) -> int:
    import torch

    old, new = torch.load(old_path), torch.load(new_path)
    bad = 0
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            print(f"{key}: only in {'new' if key in new else 'old'}")
            bad += 1
            continue
        a, b = old[key], new[key]
        differing = sum(int((a["masks"][n] != b["masks"][n]).sum()) for n in a["masks"])
        entries = sum(m.numel() for m in a["masks"].values())
        score_gap = max((abs(a["scores"][n] - b["scores"][n]) for n in a["scores"]), default=0.0)
        reports_equal = a.get("report") == b.get("report")
        same = (differing == 0 and a["scores"] == b["scores"] and a["ratios"] == b["ratios"]
                and a["selected"] == b["selected"] and reports_equal)
        bad += not same
        print(f"{key}: {differing} of {entries} mask entries differ; largest score difference "
              f"{score_gap:.3g}; ratios {'equal' if a['ratios'] == b['ratios'] else 'DIFFER'}; "
              f"selected counts {'equal' if a['selected'] == b['selected'] else 'DIFFER'}; "
              f"reports {'equal' if reports_equal else 'DIFFER'}")
    print("identical" if not bad else f"{bad} run(s) differ")
    return 1 if bad else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dump", help="write this version's fingerprints here (torch.save)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two dumps")
    p.add_argument("--samples", type=int, default=16, help="calibration samples per run")
    p.add_argument("--models", nargs="+", choices=MODELS + TINY_FAMILIES,
                   default=list(MODELS))
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.dump:
        p.error("give --dump FILE or --compare OLD NEW")
    from speed import quiet_worker  # benchmarks/ is on sys.path when run as a script

    quiet_worker()
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    result = {}
    for name in args.models:
        for run in args.runs:
            result[f"{name}/{run}"] = fingerprint(name, run, args.samples)
            print(f"# {name}/{run} done", file=sys.stderr, flush=True)
    torch.save(result, args.dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
