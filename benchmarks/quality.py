"""How much of the demo model's ability each pruning method keeps.

Prunes the shipped demo model (``tamp_modifier.demo``) with every method at
50% to 90% unstructured and 2:4, with several calibration seeds, evaluates
each pruned model on the held-out questions (500 per task family by default),
and writes, into ``--out`` (default ``benchmarks/results``):

    runs.jsonl                   each run as it finishes (a rerun skips those)
    quality.json                 every run: accuracy per task, relative
                                 performance, fidelity to the dense model
                                 (KL, answer NLL, same answer; per task and
                                 overall), wall time, peak memory
    quality.md                   mean +- std over seeds, per method and setting
    relative_vs_sparsity.png     relative performance against sparsity (paper Fig. 5)
    das_layer_sparsity.png       DAS's per-layer sparsity by projection and depth (Figs. 7, 8)

Methods (all prune the language model's Linears; towers, projector, lm_head stay dense):

    magnitude      |W| per output row (no calibration data: one run per setting)
    wanda          llm-compressor's WandaPruningModifier
    sparsegpt      llm-compressor's SparseGPTModifier
    owl            OWL block ratios (tamp_modifier.testing.baselines) handed to Wanda
    das+wanda      DiversityAwareSparsity, then Wanda at its ratios
    amia           AdaptiveInputActivation alone (uniform ratio)
    tamp           DAS + AMIA (at 2:4: AMIA alone, as the tamp_2of4 recipe)
    das+sparsegpt  DAS, then SparseGPT at its ratios
    amia+sparsegpt     AMIA's tokens only in SparseGPT's Hessian (reconstruction: sparsegpt), uniform ratio
    tamp+sparsegpt     DAS, then that at DAS's ratios (the tamp_sparsegpt recipe)
    tamp+sparsegpt-up4 the same with every token and the selected ones weighted 4x
                       (token_weighting: upweighted, selected_weight: 4)
    tamp+sparsegpt-up16  ... weighted 16x

Small models lose less than real ones at deployed sparsities, so 70% to 90% are measured
too. DAS and OWL set per-layer ratios, which N:M does not take: at 2:4 they are
skipped, and ``tamp`` (``tamp+sparsegpt*``) is AMIA (with SparseGPT) with 2:4. Runs go to ``--workers`` processes,
each on one thread; wall time and peak RSS are per run, inside its process.

    python benchmarks/quality.py --eval-per-family 200  # all, 3 seeds: ~20 min on 2 cores
    python benchmarks/quality.py --methods wanda tamp --settings 0.5 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from speed import reset_peak_rss  # benchmarks/ is on sys.path when run as a script

METHODS = ("magnitude", "wanda", "sparsegpt", "owl", "das+wanda", "amia", "tamp", "das+sparsegpt",
           "amia+sparsegpt", "tamp+sparsegpt", "tamp+sparsegpt-up4", "tamp+sparsegpt-up16")
# AMIA with reconstruction: sparsegpt, and how it weights the tokens.
SPARSEGPT_AMIA = {
    "amia+sparsegpt": {"token_weighting": "selected"},
    "tamp+sparsegpt": {"token_weighting": "selected"},
    "tamp+sparsegpt-up4": {"token_weighting": "upweighted", "selected_weight": 4.0},
    "tamp+sparsegpt-up16": {"token_weighting": "upweighted", "selected_weight": 16.0},
}
SETTINGS = ("0.5", "0.6", "0.7", "0.8", "0.9", "2:4")
RATIO_METHODS = ("owl", "das+wanda", "das+sparsegpt")  # per-layer ratios: not with N:M


def _peak_rss_mib() -> float:
    """Peak RSS since the last ``reset_peak_rss`` (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _recipe(method: str, setting: str):
    """Modifier objects for one method and setting (no YAML needed here)."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
    from tamp_modifier.text_decoder import TOWER_IGNORE

    common = dict(targets=["Linear"], ignore=list(TOWER_IGNORE))
    # Wanda and SparseGPT require `sparsity` even with N:M, and then ignore it.
    common["sparsity"] = 0.5 if setting == "2:4" else float(setting)
    if setting == "2:4":
        common["mask_structure"] = "2:4"
    # DAS keeps every layer below sparsity + max_delta < 1: at 90% the default 0.1 would not fit.
    das = DiversityAwareSparsity(max_delta=0.1 if setting == "2:4" else min(0.1, (1 - float(setting)) / 2))
    pruner = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier, "amia": AdaptiveInputActivation}
    if method in pruner:
        return [pruner[method](**common)]
    if method == "tamp":
        return [AdaptiveInputActivation(**common)] if setting == "2:4" else [
            das, AdaptiveInputActivation(**common)]
    if method in SPARSEGPT_AMIA:
        amia = AdaptiveInputActivation(reconstruction="sparsegpt", **SPARSEGPT_AMIA[method], **common)
        return [amia] if setting == "2:4" or method.startswith("amia") else [das, amia]
    if method in ("das+wanda", "das+sparsegpt"):
        return [das, pruner[method.split("+")[1]](**common)]
    raise ValueError(method)


def _owl_recipe(model, dataset, sparsity: float):
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from tamp_modifier.testing.baselines import (
        input_channel_norms,
        outlier_ratios,
        owl_sparsities,
        owl_sparsity_list,
    )
    from tamp_modifier.text_decoder import TOWER_IGNORE

    norms = input_channel_norms(model, list(dataset))
    blocks = [f"model.language_model.layers.{i}" for i in range(model.config.text_config.num_hidden_layers)]
    # Block ratios span up to sparsity + 2 lam: keep them below 1 at high sparsity.
    ratios = owl_sparsities(outlier_ratios(model, norms, blocks), sparsity, lam=min(0.08, (1 - sparsity) / 4))
    return [WandaPruningModifier(sparsity=owl_sparsity_list(model, ratios), targets=["Linear"],
                                 ignore=list(TOWER_IGNORE))], ratios


def run_one(job: dict) -> dict:
    """Prune a fresh demo model with one method/setting/seed and evaluate it (in a worker)."""
    import torch

    torch.set_num_threads(1)
    from llmcompressor import oneshot

    import tamp_modifier  # noqa: F401
    from tamp_modifier.calibration_data import collate_rows
    from tamp_modifier.demo.evaluate import answer_log_probs, compare_with_dense
    from tamp_modifier.demo.model import demo_calibration_set, load_demo_model
    from tamp_modifier.demo.tasks import make_split
    from tamp_modifier.pruning.sparsity_pattern import pruned_share
    from tamp_modifier.report.sections import attached_report
    from tamp_modifier.testing.baselines import magnitude_prune
    from tamp_modifier.text_decoder import language_linears

    method, setting, seed = job["method"], job["setting"], job["seed"]
    model, tokenizer = load_demo_model(job["model"])
    dataset = demo_calibration_set(tokenizer, job["samples"], seed)
    reset_peak_rss()
    start = time.perf_counter()
    extra = {}
    if method == "magnitude":
        structure = "2:4" if setting == "2:4" else "0:0"
        magnitude_prune(model, 0.5 if setting == "2:4" else float(setting), mask_structure=structure)
    else:
        if method == "owl":
            recipe, extra["owl_block_sparsity"] = _owl_recipe(model, dataset, float(setting))
        else:
            recipe = _recipe(method, setting)
        oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
                num_calibration_samples=len(dataset), shuffle_calibration_samples=False,
                max_seq_length=4096, data_collator=collate_rows, sequential_targets=["LlamaDecoderLayer"])
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    das = attached_report(model).get("das")
    if das:
        extra["das_layer_sparsity"] = {n: layer["assigned"] for n, layer in das["layers"].items()}
    questions = make_split("eval", job["eval_per_family"])
    dense = torch.load(job["dense_log_probs"])
    _, accuracy, fidelity = compare_with_dense(dense, answer_log_probs(model, tokenizer, questions),
                                               tokenizer, questions)
    job = {k: v for k, v in job.items() if k != "dense_log_probs"}
    return {**job, "accuracy": accuracy, "fidelity": fidelity, "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak), "sparsity": pruned_share(language_linears(model).values()), **extra}


def dense_log_probs(eval_per_family: int, path: Path, model_path: str | None = None) -> dict:
    """The dense model's answer log-probabilities, saved for the workers; returns its accuracy."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    from tamp_modifier.demo.evaluate import accuracy, answer_log_probs, greedy_answers
    from tamp_modifier.demo.model import load_demo_model
    from tamp_modifier.demo.tasks import make_split

    model, tokenizer = load_demo_model(model_path)
    questions = make_split("eval", eval_per_family)
    log_probs = answer_log_probs(model, tokenizer, questions)
    torch.save(log_probs, path)
    return accuracy(greedy_answers(log_probs, tokenizer), questions)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict], dense: dict) -> list[dict]:
    """One row per (setting, method): mean and std over seeds of each figure."""
    from tamp_modifier.demo.evaluate import relative_performance

    rows = []
    for setting in SETTINGS:
        for method in METHODS:
            group = [r for r in runs if r["method"] == method and r["setting"] == setting]
            if not group:
                continue
            rel = [relative_performance(r["accuracy"], dense)["mean"] for r in group]
            row = {"setting": setting, "method": method, "seeds": len(group), "relative": _mean_std(rel),
                   "seconds": _mean_std([r["seconds"] for r in group]),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in group),
                   "sparsity": statistics.fmean(r["sparsity"] for r in group)}
            row["accuracy"] = {f: _mean_std([r["accuracy"][f] for r in group]) for f in dense}
            measured = [r["fidelity"]["overall"] for r in group if "fidelity" in r]  # older runs lack it
            if measured:
                row["fidelity"] = {k: _mean_std([m[k] for m in measured]) for k in ("kl", "nll", "agreement")}
            rows.append(row)
    return rows


def markdown(rows: list[dict], dense: dict) -> str:
    families = list(dense)
    head = ("| setting | method | " + " | ".join(families)
            + " | relative perf. | KL(dense‖pruned) | answer NLL | same answer | time (s) | peak RSS (MiB) |")
    lines = [head, "|---|---|" + "---:|" * (len(families) + 6)]
    lines.append("| dense | - | " + " | ".join(f"{dense[f]:.1%}" for f in families)
                 + " | 100.0 | 0 | - | 100% | - | - |")
    best = {}
    for r in rows:
        best[r["setting"]] = max(best.get(r["setting"], 0.0), r["relative"][0])
    for r in rows:
        acc = " | ".join(f"{r['accuracy'][f][0]:.1%}" for f in families)
        rel = f"{r['relative'][0]:.1f} ± {r['relative'][1]:.1f}"
        if r["relative"][0] == best[r["setting"]]:
            rel = f"**{rel}**"
        fid = r.get("fidelity")
        fid = (f"{fid['kl'][0]:.4f} | {fid['nll'][0]:.4f} | {fid['agreement'][0]:.1%}" if fid
               else "- | - | -")  # runs from before the metrics existed
        lines.append(f"| {r['setting']} | {r['method']} | {acc} | {rel} | {fid} | {r['seconds'][0]:.1f} | "
                     f"{r['peak_rss_mib']} |")
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in METHODS:
        pts = [r for r in rows if r["method"] == method and r["setting"] != "2:4"]
        if pts:
            x = [float(r["setting"]) * 100 for r in pts]
            ax.errorbar(x, [r["relative"][0] for r in pts], yerr=[r["relative"][1] for r in pts],
                        marker="o", capsize=3, label=method, linewidth=2.2 if method == "tamp" else 1.2)
    ax.set_xlabel("sparsity of the language model (%)")
    ax.set_ylabel("relative performance (pruned / dense x 100)")
    ax.set_title("Demo model: relative performance against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "relative_vs_sparsity.png", dpi=120)
    plt.close(fig)

    das = next((r["das_layer_sparsity"] for r in runs
                if r.get("das_layer_sparsity") and r["setting"] == "0.5"), None)
    if not das:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    kinds = sorted({n.rsplit(".", 1)[1] for n in das})
    for kind in kinds:
        pts = sorted((int(n.split(".layers.")[1].split(".")[0]), s) for n, s in das.items()
                     if n.endswith("." + kind))
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=kind)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("assigned sparsity (%)")
    ax.set_title("DAS per-layer sparsity at 50% (calibration seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "das_layer_sparsity.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=128, help="calibration samples per run")
    p.add_argument("--eval-per-family", type=int, default=500)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--model", default=None,
                   help="a demo model folder (python -m tamp_modifier.demo.train); default: the shipped one")
    args = p.parse_args(argv)

    jobs = []
    for setting in args.settings:
        for method in args.methods:
            if setting == "2:4" and method in RATIO_METHODS:
                continue
            for seed in (args.seeds[:1] if method == "magnitude" else args.seeds):
                jobs.append({"method": method, "setting": setting, "seed": seed, "samples": args.samples,
                             "eval_per_family": args.eval_per_family, "model": args.model})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every finished run is appended to runs.jsonl at once, and a rerun skips the
    # runs already there: a crash or an interrupt loses no finished run.
    log = out / "runs.jsonl"
    key = lambda r: (r["method"], r["setting"], r["seed"], r["samples"], r["eval_per_family"],  # noqa: E731
                     r.get("model"))
    runs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {key(r) for r in runs}
    todo = [j for j in jobs if key(j) not in done]
    print(f"{len(jobs) - len(todo)} runs already in {log}; {len(todo)} to go", flush=True)
    start = time.perf_counter()
    # The dense model's answer distributions, once, for every run's fidelity figures.
    dense_path = out / f"dense_log_probs_{args.eval_per_family}.pt"
    dense = dense_log_probs(args.eval_per_family, dense_path, args.model)
    todo = [{**j, "dense_log_probs": str(dense_path)} for j in todo]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.workers) as pool:
        for i, run in enumerate(pool.imap_unordered(run_one, todo), 1):
            runs.append(run)
            with log.open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(f"[{i}/{len(todo)}] {run['method']} {run['setting']} seed {run['seed']}: "
                  + ", ".join(f"{f} {a:.0%}" for f, a in run["accuracy"].items())
                  + f", KL {run['fidelity']['overall']['kl']:.4f} ({run['seconds']:.1f} s)", flush=True)
    runs = [r for r in runs if key(r) in {key(j) for j in jobs}]
    rows = summarize(runs, dense)
    table = markdown(rows, dense)
    (out / "quality.json").write_text(json.dumps(
        {"dense_accuracy": dense, "settings": vars(args), "summary": rows, "runs": runs}, indent=1))
    (out / "quality.md").write_text(table + "\n")
    plot(rows, runs, out)
    print(table)
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
