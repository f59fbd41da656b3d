"""Peak memory against model depth: DAS, AMIA and TAMP keep one decoder layer's work at a time.

Builds the same random LLaVA (same width, same samples) with 2, 4 and 8 decoder
layers and runs each method in its own fresh process. Each process reports:

    weights   bytes of the model's parameters (grows with depth, as it must)
    baseline  RSS just before ``oneshot`` (model and data built)
    peak      peak RSS during ``oneshot`` (the peak is reset just before it)
    growth    peak - baseline: what calibration and pruning add

Per-sample work holds one Linear's outputs for one sample (AMIA's N x N
kernel and distances, DAS's per-modality sums) and the statistics are a few
numbers per layer (DAS) or one vector per Linear until its block is pruned
(AMIA), so ``growth`` should not change with depth. The samples are long
(about ``--text-tokens`` + 64 tokens) so that one N x N matrix is many MiB:
if each Linear's kernel were kept, 8 layers would add 56 of them.

RSS also counts memory glibc keeps after a free (its heap grows in steps and
large blocks freed mid-heap are not returned), which wobbles "growth" by tens
of MiB from run to run. So every configuration runs twice: with glibc's
defaults, and with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block over 64 KiB is
mapped on allocation and unmapped on free), where RSS follows the live tensors.

    python benchmarks/memory_depth.py                          # ~8 min on 2 cores
    python benchmarks/memory_depth.py --depths 2 4 --methods amia --samples 2

Results go to benchmarks/results/memory_depth.{jsonl,md} (one line per run as it ends).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import measured_calibration, method_recipe, quiet_worker  # noqa: E402  (same folder)

METHODS = ("das", "amia", "tamp")
RESULTS = Path(__file__).resolve().parent / "results"
# glibc settings per run: its defaults, and large blocks always mapped/unmapped.
MALLOC = {"default": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}}


def worker(args) -> None:
    """One oneshot run at one depth; prints a JSON line."""
    quiet_worker()
    import torch

    from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset

    torch.set_num_threads(args.threads)
    model = build_tiny_model("llava", hidden_size=512, intermediate_size=1536, num_layers=args.depth,
                             num_heads=8, num_kv_heads=2, vocab_size=2048, seed=0)
    data = make_calibration_dataset(model, args.samples, text_tokens=args.text_tokens, seed=0)
    run = measured_calibration(model, data, method_recipe(args.worker), max_seq_length=8192)
    tokens = max(int(row["input_ids"].shape[-1]) for row in data)
    print(json.dumps(dict(
        method=args.worker, depth=args.depth, seconds=round(run["seconds"], 1),
        **{k: round(run[k]) for k in ("peak_mib", "baseline_mib", "growth_mib")},
        peak_reset=run["peak_reset"],
        weights_mib=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
        tokens=tokens, kernel_mib=round(tokens * tokens * 4 / 2**20, 1), samples=len(data),
        threads=torch.get_num_threads(),
    )))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=1472, help="text tokens per sample (+64 image)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--malloc", nargs="+", choices=list(MALLOC), default=list(MALLOC))
    p.add_argument("--out", default=str(RESULTS / "memory_depth"), help="results path, without suffix")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = out.with_suffix(".jsonl")
    lines.write_text("")
    rows = []
    for malloc in args.malloc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | MALLOC[malloc]
        for method in args.methods:
            for depth in args.depths:
                cmd = [sys.executable, __file__, "--worker", method, "--depth", str(depth),
                       "--samples", str(args.samples), "--text-tokens", str(args.text_tokens),
                       "--threads", str(args.threads)]
                run = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if run.returncode:
                    sys.exit(f"{method} at depth {depth} failed:\n{run.stderr[-4000:]}")
                row = dict(json.loads(run.stdout.strip().splitlines()[-1]), malloc=malloc)
                rows.append(row)
                with lines.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"# {malloc} {method} depth {depth}: peak {row['peak_mib']} MiB, "
                      f"growth {row['growth_mib']} MiB, {row['seconds']} s", file=sys.stderr, flush=True)

    first = rows[0]
    table = [f"Random LLaVA, width 512 (MLP 1536), {first['samples']} samples of up to "
             f"{first['tokens']} tokens (one N x N float32 matrix: {first['kernel_mib']} MiB), "
             f"{first['threads']} thread(s), each run in a fresh process.", "",
             "| glibc malloc | method | layers | weights (MiB) | RSS before oneshot (MiB) | peak RSS (MiB) "
             "| growth = peak - before (MiB) | wall time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['malloc']} | {r['method']} | {r['depth']} | {r['weights_mib']} "
                     f"| {r['baseline_mib']} | {r['peak_mib']} | {r['growth_mib']} | {r['seconds']} |")
    if not all(r["peak_reset"] for r in rows):
        table.append("\nwarning: /proc/self/clear_refs not writable: peaks include building model and data")
    text = "\n".join(table)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
