"""How DAS's per-layer ratios converge with the number of samples it scores on.

DiversityAwareSparsity's ``profile_samples`` scores on the first P calibration
samples only (the pruner after it still uses all of them). This runs DAS alone
at 50% on the same 128-sample calibration set with P = 16, 32, 64 and 128, on
the shipped demo model and on the random ~60M-parameter LLaVA of
``benchmarks/speed.py``, and compares each P with P = 128: Spearman's rank
correlation of the per-layer scores and of the assigned ratios, and the largest
and mean absolute ratio difference. It also times each DAS pass.

    python benchmarks/das_samples.py                    # ~3 min on 2 cores
    python benchmarks/das_samples.py --json benchmarks/results/das_samples.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

SAMPLES = (16, 32, 64, 128)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def das_run(name: str, total: int, profile_samples: int | None) -> dict:
    from llmcompressor import oneshot

    from tamp_modifier import DiversityAwareSparsity
    from tamp_modifier.calibration_data import collate_rows
    from tamp_modifier.report.sections import attached_report
    from tamp_modifier.text_decoder import TOWER_IGNORE, text_decoder_layer_class

    sys.path.insert(0, os.path.dirname(__file__))
    from fingerprint import inputs

    model, tokenizer, data, _folder = inputs(name, total)
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=data,
        recipe=[DiversityAwareSparsity(sparsity=0.5, ignore=TOWER_IGNORE, profile_samples=profile_samples)],
        num_calibration_samples=len(data),
        shuffle_calibration_samples=False,
        max_seq_length=4096,
        data_collator=collate_rows,
        sequential_targets=[text_decoder_layer_class(model)],
    )
    seconds = time.perf_counter() - start
    das = attached_report(model)["das"]
    return {
        "seconds": seconds,
        "samples": das["samples"],
        "scores": {n: v["score"] for n, v in das["layers"].items()},
        "ratios": {n: v["assigned"] for n, v in das["layers"].items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=("demo", "random"), default=["demo", "random"])
    p.add_argument("--samples", nargs="+", type=int, default=list(SAMPLES))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    from speed import quiet_worker  # benchmarks/ is on sys.path when run as a script

    quiet_worker()
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    total = max(args.samples)
    results = {}
    print(
        "| model | samples scored | DAS pass (s) | Spearman, scores | Spearman, ratios "
        "| max abs ratio diff | mean abs ratio diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        runs = {P: das_run(name, total, None if P == total else P) for P in sorted(args.samples)}
        ref = runs[total]
        layers = list(ref["ratios"])
        for P, run in runs.items():
            diffs = [abs(run["ratios"][n] - ref["ratios"][n]) for n in layers]
            row = {
                "seconds": run["seconds"],
                "samples": run["samples"],
                "spearman_scores": spearman(
                    [run["scores"][n] for n in layers], [ref["scores"][n] for n in layers]
                ),
                "spearman_ratios": spearman(
                    [run["ratios"][n] for n in layers], [ref["ratios"][n] for n in layers]
                ),
                "max_ratio_diff": max(diffs),
                "mean_ratio_diff": sum(diffs) / len(diffs),
            }
            results.setdefault(name, {})[P] = row
            print(
                f"| {name} ({len(layers)} layers) | {P} | {row['seconds']:.1f} "
                f"| {row['spearman_scores']:.4f} | {row['spearman_ratios']:.4f} "
                f"| {row['max_ratio_diff']:.4f} | {row['mean_ratio_diff']:.4f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine_cores": len(os.sched_getaffinity(0)), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
