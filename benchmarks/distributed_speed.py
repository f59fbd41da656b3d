"""Wall time of TAMP (DAS + AMIA) in one process against two torchrun ranks, same work.

Same random LLaVA, same calibration samples, same recipe, run three ways, each
in fresh processes:

    1x1   one process, one thread
    1x2   one process, two threads (all of a 2-core machine)
    2x1   ``torchrun --nproc_per_node 2`` (gloo), one thread per rank, each rank
          calibrating on its half of the samples (``tamp_modifier.modifiers.distributed.rank_share``)

It reports the time of the ``oneshot`` call (for 2x1 the slower rank's, from a
common start after a barrier) and the end-to-end time of the command (imports,
building model and data). It also compares the final masks: 2x1 must equal
1x1 exactly (one thread each, so every sample's forward pass is bitwise the
same); 1x2 may differ in a few weights, because two threads sum matmuls in
another order and AMIA's greedy choice can flip on such a tie.

On a GPU machine the same comparison is ``--nproc_per_node N`` against one GPU.

    python benchmarks/distributed_speed.py                 # ~6 min on 2 idle cores
    python benchmarks/distributed_speed.py --samples 16 --repeats 1

The machine may be shared: runs of the three modes are interleaved, and the
table gives the median and the fastest of ``--repeats`` runs. Two threads in a
process suffer most from a busy neighbour (each op waits for the slower thread).

Results go to benchmarks/results/distributed_speed.{json,md}.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import calibrate  # noqa: E402  (same folder)

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args) -> None:
    """One rank (or the only process): oneshot, then its time and masks."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
    import torch
    import transformers
    from loguru import logger

    from tamp_modifier import AdaptiveInputActivation, DiversityAwareSparsity
    from tamp_modifier.modifiers.distributed import (
        barrier,
        gather_objects,
        init_distributed,
        is_distributed,
        rank,
        rank_share,
        world_size,
    )
    from tamp_modifier.testing.synthetic import build_random_vlm, make_calibration_dataset, save_tiny_model
    from tamp_modifier.text_decoder import TOWER_IGNORE, language_linears

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if "WORLD_SIZE" in os.environ:
        init_distributed()
    model = build_random_vlm(target_params=int(args.target_params), seed=0)
    data = rank_share(make_calibration_dataset(model, args.samples, text_tokens=args.text_tokens, seed=0))
    pruner = dict(targets=["Linear"], ignore=TOWER_IGNORE)
    recipe = [DiversityAwareSparsity(), AdaptiveInputActivation(sparsity=0.5, **pruner)]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = save_tiny_model(model, f"{folder}/dense")
        barrier()  # a common start: the ranks' times are comparable
        seconds, _ = calibrate(model, tokenizer, data, recipe)
    times = gather_objects(seconds)
    if rank() == 0:
        masks = {n: (m.weight == 0).clone() for n, m in language_linears(model).items()}
        torch.save(masks, args.masks)
        print(json.dumps(dict(
            seconds=round(max(times), 1), rank_seconds=[round(t, 1) for t in times], ranks=world_size(),
            threads=torch.get_num_threads(), distributed=is_distributed(), samples=args.samples,
            layers=model.config.text_config.num_hidden_layers,
            lm_params=sum(p.numel() for p in model.model.language_model.parameters()),
            tokens=int(sum(row["input_ids"].shape[-1] for row in data)),
        )), flush=True)
    if is_distributed():  # leave together: a rank exiting with a live group can abort (gloo threads)
        barrier()
        torch.distributed.destroy_process_group()


def launch(mode: str, args, masks: str) -> dict:
    processes, threads = (int(x) for x in mode.split("x"))
    script = [__file__, "--worker", "--threads", str(threads), "--samples", str(args.samples),
              "--text-tokens", str(args.text_tokens), "--target-params", str(args.target_params),
              "--masks", masks]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - start
    if run.returncode:
        sys.exit(f"{mode} failed:\n{run.stdout[-3000:]}\n{run.stderr[-4000:]}")
    line = next(x for x in reversed(run.stdout.strip().splitlines()) if x.startswith("{"))
    return dict(json.loads(line), mode=mode, end_to_end=round(total, 1))


def differing(a: str, b: str) -> tuple[int, int]:
    import torch

    ma, mb = torch.load(a), torch.load(b)
    return (sum(int((ma[n] != mb[n]).sum()) for n in ma), sum(m.numel() for m in ma.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per mode, interleaved")
    p.add_argument("--text-tokens", type=int, default=60, help="text tokens per sample (+196 image)")
    p.add_argument("--target-params", type=float, default=40e6, help="language-model parameters")
    p.add_argument("--modes", nargs="+", default=["1x1", "1x2", "2x1"])
    p.add_argument("--out", default=str(RESULTS / "distributed_speed"), help="results path, without suffix")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--masks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        runs: dict[str, list] = {}
        for _ in range(args.repeats):
            for mode in args.modes:
                runs.setdefault(mode, []).append(launch(mode, args, f"{folder}/{mode}.pt"))
                r = runs[mode][-1]
                print(f"# {mode}: oneshot {r['seconds']} s, end to end {r['end_to_end']} s",
                      file=sys.stderr, flush=True)
                out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), runs=runs), indent=1))
        rows = {mode: dict(rs[-1], median=statistics.median(r["seconds"] for r in rs),
                           fastest=min(r["seconds"] for r in rs),
                           end_to_end=statistics.median(r["end_to_end"] for r in rs))
                for mode, rs in runs.items()}
        comparisons = {f"{a} vs {b}": differing(f"{folder}/{a}.pt", f"{folder}/{b}.pt")
                       for a, b in (("1x1", "2x1"), ("1x2", "2x1"), ("1x1", "1x2"))
                       if a in rows and b in rows}
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), runs=runs, masks=comparisons),
                                                   indent=1))
    first = next(iter(rows.values()))
    lines = [f"TAMP (DAS + AMIA, 50%) on a random LLaVA, language model {first['lm_params'] / 1e6:.1f}M "
             f"params ({first['layers']} layers), {args.samples} samples of ~{args.text_tokens + 196} "
             f"tokens; {os.cpu_count()} CPU cores; {args.repeats} run(s) per mode.", "",
             "| processes x threads | oneshot, median (s) | oneshot, fastest (s) | vs 1x1 (fastest) "
             "| per rank, last run (s) | end to end, median (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode, r in rows.items():
        per_rank = ", ".join(map(str, r["rank_seconds"]))
        speedup = f"{rows['1x1']['fastest'] / r['fastest']:.2f}x" if "1x1" in rows else "-"
        lines.append(f"| {mode} | {r['median']:.1f} | {r['fastest']:.1f} | {speedup} | {per_rank} "
                     f"| {r['end_to_end']:.1f} |")
    lines.append("")
    for name, (diff, total) in comparisons.items():
        lines.append(f"masks {name}: {diff} of {total} weights differ")
    text = "\n".join(lines)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
