"""Dynamic visual-token pruning on the demo model: accuracy against the share of tokens kept.

For the dense demo model and a TAMP-pruned one (the shipped ``tamp`` recipe, pruned
here the way ``tamp-prune`` does), and for the default options, each option of the
spec and the FastV baseline, it measures: accuracy per task family, relative
performance against the same weights without token pruning, the share of tokens kept
(visual tokens at the language model's input, all tokens at the input, averaged over
layers), prefill FLOPs (per layer 4nd^2 + 2n^2 d + 2ndm) and the measured prefill
wall time. Writes ``benchmarks/results/token_pruning.{json,md,png}``, the JSON after
every run, so an interrupted run keeps what it measured.

    python benchmarks/token_pruning.py --tamp-model /tmp/tamp-demo  # 150 per task, 15-40 min, 2 cores
    python benchmarks/token_pruning.py --eval-per-family 500   # more questions
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tamp_modifier.demo.evaluate import answer_questions, relative_performance
from tamp_modifier.demo.model import load_demo_model, prompt_batch
from tamp_modifier.demo.tasks import FAMILIES, make_split
from tamp_modifier.token_pruning import disable_token_pruning, enable_token_pruning, fastv_options

RESULTS = Path(__file__).resolve().parent / "results"

# (name, options for enable_token_pruning); None is the model without token pruning
OURS = [
    ("default", {}),
    ("knee=largest_drop", {"knee": "largest_drop"}),
    ("knee=iqr", {"knee": "iqr"}),
    ("similarity=cosine", {"similarity": "cosine"}),
    ("layer=1", {"layer": 1}),
    ("layer=3", {"layer": 3}),
    ("layer=4", {"layer": 4}),
    ("stage 1 only", {"stage2": False}),
    ("cosine, stage 1 only", {"similarity": "cosine", "stage2": False}),
    ("stage 2 only", {"stage1": False}),
    ("min_tokens=16", {"min_tokens": 16, "stage2_min_tokens": 16}),
]
FASTV_DROPS = [0.5, 0.75, 0.9]


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eval-per-family", type=int, default=150, help="evaluation questions per task family")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timing-repeats", type=int, default=3,
                   help="prefill timings per run (the minimum is kept)")
    p.add_argument("--timing-questions", type=int, default=256,
                   help="image questions the prefill is timed on (the first ones of the split)")
    p.add_argument("--tamp-model", help="folder of a TAMP-pruned demo model: loaded if it exists, "
                   "else written there after pruning (default: prune into a temporary folder)")
    p.add_argument("--skip-tamp", action="store_true", help="only the dense model")
    p.add_argument("--timing-rounds", type=int, default=5, help="rounds of the interleaved prefill timing")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite token_pruning.md and .png from token_pruning.json, measure nothing")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of an earlier token_pruning.json, measure only the missing ones, "
                   "then redo the timing and the diagnostics")
    p.add_argument("--output", default=str(RESULTS), help="folder for token_pruning.{json,md,png}")
    return p


def tamp_pruned_model(folder: str | None):
    """The demo model pruned by the shipped ``tamp`` recipe, with tamp-prune's own functions."""
    from tamp_modifier.cli import run as cli

    if folder and (Path(folder) / "config.json").is_file():
        return load_demo_model(folder)[0]
    args = cli._parser().parse_args([])
    model, tokenizer, dataset, _ = cli._demo_inputs(args)
    with tempfile.TemporaryDirectory() as scratch:
        staging = Path(folder) if folder else Path(scratch) / "tamp"
        cli._prune(model, tokenizer, dataset, cli.resolve_recipe("tamp"), args, staging)
        if folder:
            tokenizer.save_pretrained(staging)
    return model.eval()


def prefill_seconds(model, tokenizer, questions, batch_size: int, repeats: int) -> float:
    """Wall time of the prefill (one forward, last-token logits) over ``questions``, best of ``repeats``."""
    batches = [prompt_batch(questions[i:i + batch_size], tokenizer)
               for i in range(0, len(questions), batch_size)]
    best = float("inf")
    with torch.no_grad():
        model(**batches[0], logits_to_keep=1)  # warm-up: first-call allocations are not prefill time
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                model(**batch, logits_to_keep=1)
            best = min(best, time.perf_counter() - start)
    return best


def measure(model, tokenizer, questions, image_questions, options, args, text_cfg) -> dict:
    """Accuracy, token shares, FLOPs and prefill time of ``model`` with ``options`` (None: no pruning)."""
    pruner = enable_token_pruning(model, **options) if options is not None else None
    try:
        answers = answer_questions(model, tokenizer, questions, args.batch_size)
        records = list(pruner.records) if pruner else None
        timed = image_questions[:args.timing_questions]
        seconds = prefill_seconds(model, tokenizer, timed, args.batch_size, args.timing_repeats)
    finally:
        if pruner:
            disable_token_pruning(model)
    right, total = {}, {}
    for q, a in zip(questions, answers):
        total[q.family] = total.get(q.family, 0) + 1
        right[q.family] = right.get(q.family, 0) + (a == q.answer)
    accuracy = {f: right[f] / total[f] for f in FAMILIES if f in total}
    d, m = text_cfg.hidden_size, text_cfg.intermediate_size
    n_layers = text_cfg.num_hidden_layers
    if records is None:  # no pruning: every layer sees every real token
        lengths = [int(prompt_batch([q], tokenizer)["attention_mask"].sum()) for q in image_questions]
        flops = [sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for _ in range(n_layers)) for n in lengths]
        shares = {"visual_input": 1.0, "all_input": 1.0, "layer_avg": 1.0}
        kept = {}
    else:
        image_records = [r for r in records if r.visual]
        flops = [r.flops(d, m) for r in image_records]
        shares = {
            "visual_input": statistics.mean(r.visual_share() for r in image_records),
            "all_input": statistics.mean(r.input_share() for r in image_records),
            "layer_avg": statistics.mean(r.layer_share() for r in image_records),
        }
        kept = {
            "tokens": statistics.mean(r.tokens for r in image_records),
            "visual": statistics.mean(r.visual for r in image_records),
            "stage1_visual": statistics.mean(r.stage1_visual for r in image_records),
            "stage1_tokens": statistics.mean(r.stage1_tokens for r in image_records),
            "stage2_visual": statistics.mean(r.stage2_visual for r in image_records),
            "stage2_tokens": statistics.mean(r.stage2_tokens for r in image_records),
            "stage1_visual_min": min(r.stage1_visual for r in image_records),
            "stage1_visual_max": max(r.stage1_visual for r in image_records),
        }
    return {"options": options, "accuracy": accuracy, "shares": shares, "kept": kept,
            "prefill_mflops": statistics.mean(flops) / 1e6, "prefill_seconds": seconds}


def fastv_matched_drop(default: dict) -> float:
    """FastV's drop share that leaves, in the layers after K, as many visual tokens as our default does."""
    kept = default["kept"]
    return 1.0 - kept["stage2_visual"] / kept["visual"]


def run_model(label, model, tokenizer, questions, image_questions, args, results, save):
    text_cfg = model.config.text_config
    runs = results["models"].setdefault(label, {})

    def one(name, options):
        if name in runs:  # --resume: measured already
            return
        start = time.perf_counter()
        runs[name] = measure(model, tokenizer, questions, image_questions, options, args, text_cfg)
        base = runs["none"]
        runs[name]["relative"] = relative_performance(runs[name]["accuracy"], base["accuracy"])
        runs[name]["flops_ratio"] = runs[name]["prefill_mflops"] / base["prefill_mflops"]
        runs[name]["time_ratio"] = runs[name]["prefill_seconds"] / base["prefill_seconds"]
        if label != "dense" and "dense" in results["models"]:
            dense = results["models"]["dense"]["none"]["accuracy"]
            runs[name]["relative_to_dense"] = relative_performance(runs[name]["accuracy"], dense)
        r = runs[name]
        print(f"[{label}] {name:22s} rel {r['relative']['mean']:6.1f}  layer-avg share "
              f"{r['shares']['layer_avg']:.3f}  FLOPs x{r['flops_ratio']:.3f}  time x{r['time_ratio']:.2f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        save()

    one("none", None)
    for name, options in OURS:
        one(name, options)
    for drop in FASTV_DROPS:
        one(f"FastV drop {drop:.0%}", fastv_options(drop, layer=2))
    drop = fastv_matched_drop(runs["default"])
    one(f"FastV matched ({drop:.1%})", fastv_options(drop, layer=2))
    runs["_fastv_matched_drop"] = drop


def object_retention(model, tokenizer, questions, batch_size: int) -> dict:
    """Stage 1 alone on single-object images: how often every patch of the object survives, and how
    many distinct kept sets there are (an image-independent score keeps the same set every time)."""
    from collections import Counter

    import numpy as np

    from tamp_modifier.demo.tasks import CELL, GRID

    out = {}
    for similarity in ("attention", "cosine"):
        pruner = enable_token_pruning(model, stage2=False, similarity=similarity)
        try:
            answer_questions(model, tokenizer, questions, batch_size)
        finally:
            disable_token_pruning(model)
        kept_all = 0
        for q, c in zip(questions, pruner.records):
            cells = q.image.reshape(GRID, CELL, GRID, CELL, 3).transpose(0, 2, 1, 3, 4)
            objects = set(np.flatnonzero(cells.reshape(GRID * GRID, -1).any(-1)).tolist())
            first = min(c.kept_stage1)  # the prompt is <s> then the image: column 1 is patch 0
            kept = {k - first - 1 for k in c.kept_stage1}
            kept_all += objects <= kept
        sets = Counter(c.kept_stage1 for c in pruner.records)
        out[similarity] = {"questions": len(questions), "object_kept": kept_all / len(questions),
                           "distinct_kept_sets": len(sets), "most_common_set_share":
                           sets.most_common(1)[0][1] / len(questions),
                           "mean_visual_kept": statistics.mean(c.stage1_visual for c in pruner.records)}
    return out


def timed_configs(runs) -> dict:
    """The runs timed head to head: none, our default and its stages, FastV 50% and matched."""
    names = ["none", "default", "stage 1 only", "stage 2 only", "FastV drop 50%"]
    names += [n for n in runs if n.startswith("FastV matched")]
    return {n: runs[n]["options"] for n in names if n in runs}


def interleaved_timing(model, tokenizer, image_questions, configs: dict, rounds: int,
                       batch_size: int) -> dict:
    """Prefill time per config, interleaved round by round so that load on a shared machine hits
    every config alike; the minimum over rounds is kept. One torch thread, and both the wall time
    and the process CPU time (which other processes' load inflates far less). Batch ``batch_size``
    over 128 image questions, and batch 1 over 16 (latency)."""
    setups = {
        f"batch {batch_size}": [prompt_batch(image_questions[i:i + batch_size], tokenizer)
                                for i in range(0, min(128, len(image_questions)), batch_size)],
        "batch 1": [prompt_batch([q], tokenizer) for q in image_questions[:16]],
    }
    best = {(setup, clock): {name: float("inf") for name in configs}
            for setup in setups for clock in ("wall", "cpu")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(rounds):
                for name, options in configs.items():
                    pruner = enable_token_pruning(model, **options) if options is not None else None
                    try:
                        for setup, batches in setups.items():
                            model(**batches[0], logits_to_keep=1)  # warm-up
                            wall, cpu = time.perf_counter(), time.process_time()
                            for batch in batches:
                                model(**batch, logits_to_keep=1)
                            for clock, elapsed in (("wall", time.perf_counter() - wall),
                                                   ("cpu", time.process_time() - cpu)):
                                best[setup, clock][name] = min(best[setup, clock][name], elapsed)
                    finally:
                        if pruner:
                            disable_token_pruning(model)
    finally:
        torch.set_num_threads(threads)
    return {f"{setup}, {clock}": {name: {"seconds": t, "ratio": t / times["none"]}
                                  for name, t in times.items()}
            for (setup, clock), times in best.items()}


def markdown(results) -> str:
    lines = [
        "# Visual-token pruning on the demo model",
        "",
        f"{results['settings']['eval_per_family']} held-out questions per task; shares, FLOPs and "
        "prefill time over the image questions (text-only questions have no visual token and are not "
        "pruned). "
        "`relative` is accuracy / the same weights without token pruning x 100, mean over the "
        f"{len(FAMILIES)} tasks. "
        "FLOPs: prefill FLOPs of the decoder layers, ratio to no pruning. Accuracy per task in %. "
        "Prefill times are in the tables at the end (the per-run `prefill_seconds` in the JSON were "
        "taken under other jobs' load and are not comparable).",
        "",
    ]
    for label, runs in results["models"].items():
        lines += [f"## {label} model", "",
                  "| run | visual at input | all at input | layer-avg | FLOPs | "
                  + " | ".join(FAMILIES) + " | relative |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(FAMILIES) + "---:|"]
        order = ["none", *(n for n, _ in OURS)]
        names = sorted((n for n in runs if not n.startswith("_")),
                       key=lambda n: (order.index(n) if n in order else len(order), n))
        for name in names:
            r = runs[name]
            s = r["shares"]
            acc = " | ".join(f"{100 * r['accuracy'][f]:.1f}" for f in FAMILIES)
            lines.append(
                f"| {name} | {s['visual_input']:.1%} | {s['all_input']:.1%} | {s['layer_avg']:.1%} | "
                f"{r['flops_ratio']:.3f} | {acc} | {r['relative']['mean']:.1f} |"
            )
        lines.append("")
    if "object_retention" in results:
        lines += ["## Stage 1 alone on the single-object position images (dense model)", "",
                  "| CLS similarity | object patches all kept | distinct kept sets | commonest set | "
                  "visual tokens kept |", "|---|---:|---:|---:|---:|"]
        for name, r in results["object_retention"].items():
            lines.append(f"| {name} | {r['object_kept']:.1%} | {r['distinct_kept_sets']} of "
                         f"{r['questions']} | {r['most_common_set_share']:.1%} | "
                         f"{r['mean_visual_kept']:.1f} |")
        lines.append("")
    for label, timing in results.get("timing", {}).items():
        setups = list(timing)
        lines += [f"## Prefill time, {label} model (one thread, interleaved, best of "
                  f"{results['settings'].get('timing_rounds')} rounds; wall and process CPU time)", "",
                  "| run | " + " | ".join(f"{s} (ms)" for s in setups) + " | "
                  + " | ".join(f"{s} vs none" for s in setups) + " |",
                  "|---|" + "---:|" * (2 * len(setups))]
        for name in timing[setups[0]]:
            ms = " | ".join(f"{1000 * timing[s][name]['seconds']:.1f}" for s in setups)
            ratio = " | ".join(f"{timing[s][name]['ratio']:.2f}" for s in setups)
            lines.append(f"| {name} | {ms} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 9), squeeze=False)
    for col, label in enumerate(models):
        runs = {k: v for k, v in results["models"][label].items() if not k.startswith("_")}
        for row, (key, title) in enumerate([("layer_avg", "tokens kept, averaged over layers"),
                                            ("all_input", "tokens kept at the language model's input")]):
            ax = axes[row][col]
            fastv = sorted((r["shares"][key], r["relative"]["mean"])
                           for n, r in runs.items() if n.startswith("FastV"))
            ax.plot(*zip(*fastv), "s--", color="grey", label="FastV (K=2), drop 50/75/90% and matched")
            for name, r in runs.items():
                if name.startswith("FastV"):
                    continue
                marker = "*" if name == "default" else ("o" if name != "none" else "D")
                size = 16 if name == "default" else 8
                ax.plot(r["shares"][key], r["relative"]["mean"], marker, markersize=size, label=name)
            ax.set_xlabel(f"share of {title}")
            ax.set_ylabel("relative performance vs the same weights unpruned")
            ax.set_title(f"{label} weights")
            ax.set_xlim(0, 1.05)
            ax.grid(alpha=0.3)
            if row == 0 and col == len(models) - 1:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "token_pruning.json").read_text())
        (out / "token_pruning.md").write_text(markdown(results))
        plot(results, out / "token_pruning.png")
        return 0
    questions = make_split("eval", args.eval_per_family)
    image_questions = [q for q in questions if q.image is not None]
    if args.resume and (out / "token_pruning.json").is_file():
        results = json.loads((out / "token_pruning.json").read_text())
        questions = make_split("eval", results["settings"]["eval_per_family"])
        image_questions = [q for q in questions if q.image is not None]
    else:
        settings = {"eval_per_family": args.eval_per_family, "batch_size": args.batch_size,
                    "timing_repeats": args.timing_repeats, "timing_questions": args.timing_questions,
                    "torch_threads": torch.get_num_threads()}
        results = {"settings": settings, "models": {}}
    results["settings"]["timing_rounds"] = args.timing_rounds
    results["timing"] = {}

    def save():
        (out / "token_pruning.json").write_text(json.dumps(results, indent=1))

    dense, tokenizer = load_demo_model()
    models = {"dense": dense}
    run_model("dense", dense, tokenizer, questions, image_questions, args, results, save)
    if not args.skip_tamp:
        start = time.perf_counter()
        models["TAMP 50%"] = tamp_pruned_model(args.tamp_model)
        results["settings"].setdefault("tamp_prune_seconds", round(time.perf_counter() - start, 1))
        run_model("TAMP 50%", models["TAMP 50%"], tokenizer, questions, image_questions, args, results, save)
    position = make_split("eval", results["settings"]["eval_per_family"], families=("position",))
    results["object_retention"] = object_retention(dense, tokenizer, position, args.batch_size)
    save()
    for label, model in models.items():
        configs = timed_configs(results["models"][label])
        results["timing"][label] = interleaved_timing(model, tokenizer, image_questions, configs,
                                                      args.timing_rounds, args.batch_size)
        save()
    (out / "token_pruning.md").write_text(markdown(results))
    plot(results, out / "token_pruning.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
