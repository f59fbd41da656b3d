"""What TAMP's modifiers cost next to Wanda: wall time and peak memory.

Runs llm-compressor's ``oneshot`` on a random ~60M-parameter LLaVA with 128
calibration samples of ~256 tokens (196 image + ~60 text), once per method, each
in its own fresh subprocess so peak memory is not shared between methods:

    wanda      WandaPruningModifier(sparsity=0.5) alone: the baseline
    das        DiversityAwareSparsity(sparsity=0.5) alone: a profiling run, i.e.
               DAS's calibration pipeline only (one forward pass per layer,
               nothing is pruned)
    das+wanda  DAS followed by Wanda: the full recipe (two calibration pipelines)
    amia       AdaptiveInputActivation(sparsity=0.5) alone: Wanda with AMIA's tokens
    tamp       DAS followed by AMIA: TAMP (two calibration pipelines)
    tamp_das32 TAMP with DAS scoring the first 32 samples (profile_samples: 32)
    sparsegpt  SparseGPTModifier(sparsity=0.5) alone (llm-compressor's)
    tamp_sparsegpt  DAS followed by AMIA with reconstruction: sparsegpt (the
               tamp_sparsegpt recipe: AMIA's tokens in SparseGPT's Hessian)

For each it times only the ``oneshot(...)`` call (model and data are built
first, same seed for every method) and reads the process's peak RSS during
``oneshot`` (the peak is reset just before it via /proc/self/clear_refs, since
building the data peaks higher); "growth" is that peak minus the RSS just
before ``oneshot``. For AMIA it also splits the time into token selection,
pruning, and the rest (the calibration forward passes). The methods run
interleaved (wanda, das, ..., then again), so drifting machine load hits them
alike; each method's time ratio to Wanda is taken within each round and the
median over the rounds is reported. Targets: the DAS pass at most 0.6x Wanda's
wall time, AMIA at most 1.15x, TAMP at most 1.6x, and every method's peak
memory at most 1.25x Wanda's. This script only prints figures; it asserts
nothing.

    python benchmarks/speed.py                       # defaults, ~20 min on 2 cores
    python benchmarks/speed.py --samples 16 --repeats 3 --json out.json
    python benchmarks/speed.py --methods wanda das
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("wanda", "das", "das+wanda", "amia", "tamp", "tamp_das32", "sparsegpt", "tamp_sparsegpt")
CORES = len(os.sched_getaffinity(0))


def rss_mib():
    """VmRSS (current RSS) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def reset_peak_rss():
    """Make the peak RSS (VmHWM, ru_maxrss) restart from the current RSS (Linux >= 4.0).

    Building the calibration set peaks above everything oneshot does, so without
    this the peak would measure data preparation, not the method."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def method_recipe(method: str) -> list:
    """The modifiers a benchmark method runs: 50% on the language model's Linears."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
    from tamp_modifier.text_decoder import TOWER_IGNORE

    pruner = dict(targets=["Linear"], ignore=TOWER_IGNORE)
    return {
        "wanda": lambda: [WandaPruningModifier(sparsity=0.5, **pruner)],
        "das": lambda: [DiversityAwareSparsity(sparsity=0.5, ignore=TOWER_IGNORE)],
        "das+wanda": lambda: [DiversityAwareSparsity(), WandaPruningModifier(sparsity=0.5, **pruner)],
        "amia": lambda: [AdaptiveInputActivation(sparsity=0.5, **pruner)],
        "tamp": lambda: [DiversityAwareSparsity(), AdaptiveInputActivation(sparsity=0.5, **pruner)],
        "tamp_das32": lambda: [DiversityAwareSparsity(profile_samples=32),
                               AdaptiveInputActivation(sparsity=0.5, **pruner)],
        "sparsegpt": lambda: [SparseGPTModifier(sparsity=0.5, **pruner)],
        "tamp_sparsegpt": lambda: [DiversityAwareSparsity(),
                                   AdaptiveInputActivation(sparsity=0.5, reconstruction="sparsegpt", **pruner)],
    }[method]()


def calibrate(model, tokenizer, data, recipe, max_seq_length: int = 4096) -> tuple[float, float]:
    """oneshot on pre-tokenised rows, in order; returns (wall seconds, process CPU seconds)."""
    from llmcompressor import oneshot

    from tamp_modifier.calibration_data import collate_rows
    from tamp_modifier.text_decoder import text_decoder_layer_class

    t0, cpu0 = time.perf_counter(), time.process_time()
    oneshot(
        model=model, processor=tokenizer, dataset=data, recipe=recipe,
        num_calibration_samples=len(data), shuffle_calibration_samples=False,
        max_seq_length=max_seq_length, data_collator=collate_rows,
        sequential_targets=[text_decoder_layer_class(model)],
    )
    return time.perf_counter() - t0, time.process_time() - cpu0


def measured_calibration(model, data, recipe, max_seq_length: int = 4096) -> dict:
    """``calibrate`` with the memory figures: RSS before oneshot, peak RSS during it (MiB)."""
    from tamp_modifier.testing.synthetic import save_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tiny_model(model, folder)
        baseline = rss_mib()
        reset = reset_peak_rss()
        seconds, cpu = calibrate(model, tokenizer, data, recipe, max_seq_length)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; = VmHWM
    return dict(seconds=seconds, cpu_s=cpu, baseline_mib=baseline, peak_mib=peak,
                growth_mib=peak - baseline, peak_reset=reset)


def quiet_worker() -> None:
    """A benchmark process's output down to warnings: no progress bars, no INFO logs.

    Call before llm-compressor is imported (it reads its log level at import)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    import transformers
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers.logging.set_verbosity_error()


def worker(args):
    """One oneshot run of one method; prints a JSON line."""
    quiet_worker()
    import torch

    torch.set_num_threads(CORES)

    from tamp_modifier.report.sections import attached_report
    from tamp_modifier.testing.synthetic import build_random_vlm, make_calibration_dataset

    model = build_random_vlm(target_params=int(args.target_params), seed=0)
    ds = make_calibration_dataset(model, args.samples, text_tokens=args.text_tokens, seed=0)
    run = measured_calibration(model, ds, method_recipe(args.worker))
    lengths = [row["input_ids"].shape[-1] for row in ds]
    split = attached_report(model).get("amia", {}).get("seconds", {})
    print(json.dumps(dict(
        method=args.worker, **run, torch=torch.__version__, threads=torch.get_num_threads(),
        params=sum(p.numel() for p in model.parameters()),
        lm_params=sum(p.numel() for p in model.model.language_model.parameters()),
        layers=model.config.text_config.num_hidden_layers,
        tokens=statistics.mean(lengths), tokens_min=min(lengths), tokens_max=max(lengths),
        selection_s=split.get("selection"), statistics_s=split.get("statistics"), pruning_s=split.get("pruning"),
    )))


def run(method, args):
    cmd = [sys.executable, __file__, "--worker", method, "--samples", str(args.samples),
           "--text-tokens", str(args.text_tokens), "--target-params", str(args.target_params)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{method} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--text-tokens", type=int, default=60, help="text tokens per sample (+196 image)")
    p.add_argument("--target-params", type=float, default=60e6, help="language-model parameters")
    p.add_argument("--repeats", type=int, default=3, help="rounds of runs; medians reported")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs = {}
    for i in range(args.repeats):  # interleaved, so drifting machine load hits all methods
        for method in args.methods:
            r = run(method, args)
            print(f"# {method} run {i + 1}/{args.repeats}: {r['seconds']:.1f} s, "
                  f"peak {r['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            runs.setdefault(method, []).append(r)
    base_runs = runs.get("wanda")
    results = {}
    for m, rs in runs.items():
        results[m] = dict(rs[0], seconds=statistics.median(r["seconds"] for r in rs),
                          cpu_s=statistics.median(r["cpu_s"] for r in rs),
                          peak_mib=max(r["peak_mib"] for r in rs),
                          growth_mib=max(r["growth_mib"] for r in rs),
                          all_seconds=[r["seconds"] for r in rs])
        if base_runs:  # ratio within each round, then the median over rounds
            results[m]["time_ratio"] = statistics.median(
                r["seconds"] / b["seconds"] for r, b in zip(rs, base_runs))
            results[m]["peak_ratio"] = results[m]["peak_mib"] / max(b["peak_mib"] for b in base_runs)

    info = next(iter(results.values()))
    print(f"machine: {CORES} cores, torch {info['torch']} ({info['threads']} threads), python "
          f"{sys.version.split()[0]}, load average before the runs {load_before}")
    print(f"model: random LLaVA, {info['params'] / 1e6:.1f}M params, language model "
          f"{info['lm_params'] / 1e6:.1f}M ({info['layers']} layers); {args.samples} samples of "
          f"{info['tokens']:.0f} tokens ({info['tokens_min']}-{info['tokens_max']}); "
          f"{args.repeats} interleaved round(s); median time, median of the per-round ratios, max memory\n")

    def ratio(r, k):
        return f"{r[k]:.2f}x" if k in r else "-"

    print("| method | wall time (s) | all runs (s) | time vs Wanda | CPU time (s) "
          "| peak RSS (MiB) | growth (MiB) | peak vs Wanda |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        every = " / ".join(f"{x:.1f}" for x in r["all_seconds"])
        print(f"| {m} | {r['seconds']:.1f} | {every} | {ratio(r, 'time_ratio')} "
              f"| {r['cpu_s']:.0f} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} "
              f"| {ratio(r, 'peak_ratio')} |")
    for m, r in results.items():
        if r.get("selection_s") is not None:
            statistics_s = r.get("statistics_s") or 0.0
            rest = r["seconds"] - r["selection_s"] - statistics_s - r["pruning_s"]
            print(f"\n{m} time split (first run): token selection {r['selection_s']:.1f} s, statistics "
                  f"(norms or Hessians) {statistics_s:.1f} s, pruning {r['pruning_s']:.1f} s, calibration "
                  f"passes and the rest {rest:.1f} s")
    if not all(r["peak_reset"] for r in results.values()):
        print("\nwarning: /proc/self/clear_refs not writable: peaks include building the data")
    targets = {"das": 0.6, "amia": 1.15, "tamp": 1.6, "tamp_das32": 1.6}
    if base_runs:
        print()
        for m, r in results.items():
            line = f"target, {m} vs Wanda:"
            if m in targets:
                met = "met" if r["time_ratio"] <= targets[m] else "NOT met"
                line += f" time {r['time_ratio']:.2f}x (<= {targets[m]}x: {met}),"
            met = "met" if r["peak_ratio"] <= 1.25 else "NOT met"
            print(f"{line} peak memory {r['peak_ratio']:.2f}x (<= 1.25x: {met})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), cores=CORES, results=results), f, indent=2)


if __name__ == "__main__":
    main()
