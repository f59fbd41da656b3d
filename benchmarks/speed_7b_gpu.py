"""Wanda, DAS, AMIA and TAMP at 7B shapes on one GPU: wall time and peak GPU memory.

The CPU benchmark (``benchmarks/speed.py``) runs a 60M model; this one runs the
same four recipes of ``speed.py`` (50% on the language model's Linears) on a
random LLaVA-1.5-7B-shaped model (Llama-2-7B text model under a CLIP
ViT-L/14-336 tower, ``tamp_modifier.testing.synthetic.build_llava_7b_shaped``) in
bfloat16, with 128 calibration samples of 2048 tokens (576 image + 1472 text),
the paper's setting. Each method runs in its own process; the script times the
``oneshot`` call only and reads ``torch.cuda.max_memory_allocated`` over it.
Results are printed as each method ends and appended to ``--jsonl``, so a run
cut short keeps what it finished.

    python benchmarks/speed_7b_gpu.py                      # one H200: ~8-10 min
    python benchmarks/speed_7b_gpu.py --methods wanda tamp --samples 32
    python benchmarks/speed_7b_gpu.py --device cpu --layers 1 --samples 2 --tokens 640 \\
        --dtype float32                                    # smoke run on a CPU

It asserts nothing; it prints figures. A GPU has not run it yet (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = ("wanda", "das", "amia", "tamp")
IMAGE_TOKENS = 576


def worker(args) -> None:
    from speed import calibrate, method_recipe, quiet_worker

    quiet_worker()
    import torch

    from tamp_modifier.report.sections import attached_report
    from tamp_modifier.testing.synthetic import (
        build_llava_7b_shaped,
        make_calibration_dataset,
        save_tiny_model,
    )

    dtype = getattr(torch, args.dtype)
    built = time.perf_counter()
    model = build_llava_7b_shaped(args.layers, dtype=dtype, device=args.device)
    data = make_calibration_dataset(model, args.samples, text_tokens=args.tokens - IMAGE_TOKENS, seed=0)
    built = time.perf_counter() - built
    gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tiny_model(model, folder)
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        seconds, cpu = calibrate(model, tokenizer, data, method_recipe(args.worker))
        if gpu:
            torch.cuda.synchronize()
    split = attached_report(model).get("amia", {}).get("seconds", {})
    print(json.dumps(dict(
        method=args.worker, seconds=seconds, cpu_s=cpu, build_s=built,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        before_gib=before / 2**30 if gpu else None,
        device=torch.cuda.get_device_name() if gpu else "cpu",
        params=sum(p.numel() for p in model.parameters()), layers=args.layers,
        samples=args.samples, tokens=args.tokens, dtype=args.dtype, torch=torch.__version__,
        selection_s=split.get("selection"), pruning_s=split.get("pruning"),
    )))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32 in a real 7B)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048, help=f"tokens per sample ({IMAGE_TOKENS} image)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--jsonl", default="speed_7b_gpu.jsonl", help="results, one line per method")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tokens <= IMAGE_TOKENS:
        p.error(f"--tokens must exceed the {IMAGE_TOKENS} image tokens")
    if args.worker:
        worker(args)
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("speed_7b_gpu: no CUDA device here; pass --device cpu for a (small) smoke run")

    results = {}
    for method in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--layers", str(args.layers),
               "--samples", str(args.samples), "--tokens", str(args.tokens), "--dtype", args.dtype,
               "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"# {method} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[method] = r
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        peak = f", peak GPU memory {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        print(f"# {method}: {r['seconds']:.1f} s{peak} (model and data built in {r['build_s']:.0f} s)",
              flush=True)

    if not results:
        return 1
    info = next(iter(results.values()))
    print(f"\n{info['device']}, torch {info['torch']}, {info['dtype']}; random LLaVA-1.5-7B shape, "
          f"{info['params'] / 1e9:.2f}B params, {info['layers']} decoder layers; {info['samples']} "
          f"samples of {info['tokens']} tokens\n")
    base = results.get("wanda")
    print("| method | oneshot (s) | vs Wanda | peak GPU memory (GiB) | vs Wanda | AMIA selection (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        t_ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        m_ratio = (f"{r['peak_gib'] / base['peak_gib']:.2f}x"
                   if base and r["peak_gib"] is not None else "-")
        sel = f"{r['selection_s']:.1f}" if r.get("selection_s") is not None else "-"
        print(f"| {m} | {r['seconds']:.1f} | {t_ratio} | {peak} | {m_ratio} | {sel} |")
    if base and len(results) > 1:
        ratios = [r["seconds"] / base["seconds"] for m, r in results.items() if m != "wanda"]
        print(f"\nmedian time ratio to Wanda over the other methods: {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
