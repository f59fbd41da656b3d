"""Dense fp16 against torch's 2:4 semi-structured kernels, on an NVIDIA GPU.

Three measurements, each dense first, then the same weights converted with
``tamp_modifier.deploy.semi_structured.to_semi_structured``:

    matmul  one Linear per 7B-model shape (out x in: 11008x4096 gate/up, 4096x11008
            down, 4096x4096 q/k/v/o) at 1, 16, 128 and 2048 tokens
    demo    the shipped demo LLaVA (language model width 192), its language-model
            Linears pruned 2:4 by magnitude: prefill of a batch of prompts, and
            decode time per generated token
    large   a random Llama decoder with 7B-shaped layers (hidden 4096, MLP 11008,
            32 heads; --layers of them, 4 by default), every Linear but lm_head
            pruned 2:4 by magnitude: prefill and decode, as above

Magnitude 2:4 pruning is used because the speed of a 2:4 matmul does not depend
on which two weights of four are kept (TAMP's or magnitude's mask run the same
kernels); it is instant where a calibrated recipe would take minutes.

Timing: CUDA events around each call, after warm-up calls, medians over
``--repeats`` (minimum also kept). Decode time per token is
``(generate(N tokens) - generate(1 token)) / (N - 1)``, greedy, with
``min_new_tokens`` so no run stops early. Outputs are compared too: the largest
logit difference relative to the largest dense logit, and the share of greedy
tokens that agree.

    python benchmarks/semi_structured_speed.py --output semi_structured.json
    python benchmarks/semi_structured_speed.py --parts matmul --repeats 100 --output mm.json

The results go to ``--output`` (JSON, rewritten after every measurement) and a
table is printed at the end. On a machine without an Ampere-or-newer NVIDIA GPU
the script stops at once with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tamp_modifier.deploy.semi_structured import resolve_backend, to_semi_structured
from tamp_modifier.testing.baselines import magnitude_prune

PARTS = ("matmul", "demo", "large")
MATMUL_SHAPES = ((11008, 4096), (4096, 11008), (4096, 4096))
MATMUL_TOKENS = (1, 16, 128, 2048)
DEMO_BATCHES = (1, 64)  # prompts of 64 image tokens + 5 to 7 words
LARGE_SHAPES = ((1, 128), (16, 128), (1, 2048), (8, 512))  # (batch, prompt tokens)


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median and minimum wall time of ``fn()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:  # only for trying the script's logic on CPU; main() refuses CPU
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def relative_difference(sparse: torch.Tensor, dense: torch.Tensor) -> float:
    """max |sparse - dense| / max |dense|, in float32."""
    dense = dense.float()
    return float((sparse.float() - dense).abs().max() / dense.abs().max().clamp_min(1e-12))


def allocated_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- the parts


def bench_matmul(device, dtype, backend, repeats, warmup, record) -> None:
    """One Linear per shape, dense then 2:4 sparse, at each token count."""
    for out_features, in_features in MATMUL_SHAPES:
        bench_one_linear(out_features, in_features, device, dtype, backend, repeats, warmup, record)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_one_linear(out_features, in_features, device, dtype, backend, repeats, warmup, record) -> None:
    layer = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    holder = torch.nn.Sequential(layer)
    magnitude_prune(holder, 0.5, mask_structure="2:4", targets=["Linear"], ignore=[])
    inputs = {t: torch.randn(t, in_features, device=device, dtype=dtype) for t in MATMUL_TOKENS}
    with torch.no_grad():
        dense_out = {t: layer(x) for t, x in inputs.items()}
        dense_time = {t: time_ms(lambda x=x: layer(x), device, repeats, warmup) for t, x in inputs.items()}
        to_semi_structured(holder, backend=backend)
        for t, x in inputs.items():
            sparse_time = time_ms(lambda x=x: layer(x), device, repeats, warmup)
            record("matmul", {
                "shape": [out_features, in_features], "tokens": t,
                "dense": dense_time[t], "sparse": sparse_time,
                "speedup": dense_time[t]["median_ms"] / sparse_time["median_ms"],
                "relative_difference": relative_difference(layer(x), dense_out[t]),
            })


def bench_model(name, model, batches, device, dtype, backend, repeats, warmup, new_tokens, record) -> None:
    """Prefill and decode of ``model`` for each batch, dense then converted in place."""
    model.to(device=device, dtype=dtype).eval()
    batches = {
        label: {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
        for label, batch in batches.items()
    }

    def generate(batch, tokens):
        return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=0)

    def measure():
        out = {}
        with torch.no_grad():
            for label, batch in batches.items():
                logits = model(**batch, use_cache=False).logits[:, -1]
                prefill = time_ms(lambda b=batch: model(**b, use_cache=False), device, repeats, warmup)
                tokens = generate(batch, new_tokens)
                runs = max(3, repeats // 2)
                one = time_ms(lambda b=batch: generate(b, 1), device, runs, 1)
                full = time_ms(lambda b=batch: generate(b, new_tokens), device, runs, 1)
                out[label] = {
                    "logits": logits, "tokens": tokens, "prefill": prefill,
                    "decode_ms_per_token": (full["median_ms"] - one["median_ms"]) / (new_tokens - 1),
                }
        return out

    dense = measure()
    dense_mib = allocated_mib(device)
    report = to_semi_structured(model, backend=backend)
    sparse_mib = allocated_mib(device)
    sparse = measure()
    for label, batch in batches.items():
        d, s = dense[label], sparse[label]
        record(name, {
            "batch": label, "input_shape": list(batch["input_ids"].shape), "new_tokens": new_tokens,
            "prefill_dense": d["prefill"], "prefill_sparse": s["prefill"],
            "prefill_speedup": d["prefill"]["median_ms"] / s["prefill"]["median_ms"],
            "decode_ms_per_token_dense": d["decode_ms_per_token"],
            "decode_ms_per_token_sparse": s["decode_ms_per_token"],
            "decode_speedup": d["decode_ms_per_token"] / s["decode_ms_per_token"],
            "last_logits_relative_difference": relative_difference(s["logits"], d["logits"]),
            "greedy_tokens_agree": float((s["tokens"] == d["tokens"]).float().mean()),
            "converted_share_of_language_linears": report.converted_share,
            "converted_linears": len(report.converted),
            "allocated_mib_dense": dense_mib, "allocated_mib_sparse": sparse_mib,
        })


def demo_model_and_batches(sizes):
    """The shipped demo LLaVA, 2:4 by magnitude, and left-padded batches of image questions."""
    from tamp_modifier.demo.model import load_demo_model, prompt_batch
    from tamp_modifier.demo.tasks import IMAGE_FAMILIES, make_split

    model, tokenizer = load_demo_model()
    magnitude_prune(model, 0.5, mask_structure="2:4")  # language-model Linears, as the recipes prune
    questions = make_split("eval", -(-max(sizes) // len(IMAGE_FAMILIES)), seed=0, families=IMAGE_FAMILIES)
    return model, {f"batch {b}": prompt_batch(questions[:b], tokenizer) for b in sizes}


def large_model_and_batches(layers, shapes, device, dtype, hidden=4096, intermediate=11008, heads=32):
    """A random Llama decoder (Llama-2-7B layer sizes by default), built on the device, 2:4 by
    magnitude in every Linear but lm_head, and random prompts of ``shapes`` (batch, tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    magnitude_prune(model, 0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    gen = torch.Generator().manual_seed(0)
    return model, {
        f"{b}x{t}": {"input_ids": torch.randint(3, 32000, (b, t), generator=gen),
                     "attention_mask": torch.ones(b, t, dtype=torch.long)}
        for b, t in shapes
    }


# ----------------------------------------------------------------------------- output


def table(results: dict) -> str:
    """The results as plain-text tables (medians)."""
    lines = []
    if results.get("matmul"):
        lines += ["matmul (one Linear, out x in)",
                  f"{'shape':>12} {'tokens':>7} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>9} "
                  f"{'rel. diff':>10}"]
        for r in results["matmul"]:
            shape = "x".join(map(str, r["shape"]))
            lines.append(
                f"{shape:>12} {r['tokens']:>7} {r['dense']['median_ms']:>9.4f} "
                f"{r['sparse']['median_ms']:>9.4f} {r['speedup']:>8.2f}x {r['relative_difference']:>10.2e}"
            )
    for part in ("demo", "large"):
        if not results.get(part):
            continue
        lines += ["", f"{part} model (ms; decode is per generated token)",
                  f"{'batch':>12} {'prefill dense':>14} {'2:4':>9} {'x':>6} {'decode dense':>13} {'2:4':>8} "
                  f"{'x':>6} {'rel. diff':>10} {'tokens agree':>13}"]
        for r in results[part]:
            lines.append(
                f"{r['batch']:>12} {r['prefill_dense']['median_ms']:>14.3f} "
                f"{r['prefill_sparse']['median_ms']:>9.3f} "
                f"{r['prefill_speedup']:>5.2f}x {r['decode_ms_per_token_dense']:>13.3f} "
                f"{r['decode_ms_per_token_sparse']:>8.3f} {r['decode_speedup']:>5.2f}x "
                f"{r['last_logits_relative_difference']:>10.2e} {100 * r['greedy_tokens_agree']:>12.1f}%"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="JSON file for the results")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--backend", choices=("auto", "cusparselt", "cutlass"), default="auto")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (median kept)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the large random model")
    parser.add_argument("--hidden", type=int, default=4096, help="large model width (7B: 4096)")
    parser.add_argument("--intermediate", type=int, default=11008, help="large model MLP width (7B: 11008)")
    parser.add_argument("--heads", type=int, default=32, help="large model attention heads (7B: 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated to time decoding")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("semi_structured_speed.py measures NVIDIA GPU kernels: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Run it on an Ampere-or-newer NVIDIA GPU with a CUDA build of "
              "torch. Nothing was measured.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    try:
        backend = resolve_backend(args.backend, device)
    except RuntimeError as error:
        print(f"semi_structured_speed.py: {error}. Nothing was measured.", file=sys.stderr)
        return 2
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode time is a difference of two runs)")
    dtype = getattr(torch, args.dtype)

    results = {
        "device": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cusparselt": torch.backends.cusparselt.version(), "backend": backend, "dtype": args.dtype,
        "repeats": args.repeats, "warmup": args.warmup,
        "matmul": [], "demo": [], "large": [],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def record(part, row):
        results[part].append(row)
        args.output.write_text(json.dumps(results, indent=2))
        print(f"[{part}] {json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)})}", flush=True)

    if "matmul" in args.parts:
        bench_matmul(device, dtype, backend, args.repeats * 5, args.warmup, record)
    if "demo" in args.parts:
        model, batches = demo_model_and_batches(DEMO_BATCHES)
        bench_model("demo", model, batches, device, dtype, backend, args.repeats, args.warmup,
                    args.new_tokens, record)
        del model
    if "large" in args.parts:
        torch.cuda.empty_cache()
        model, batches = large_model_and_batches(args.layers, LARGE_SHAPES, device, dtype,
                                                 args.hidden, args.intermediate, args.heads)
        bench_model("large", model, batches, device, dtype, backend, args.repeats, args.warmup,
                    args.new_tokens, record)
        del model
    args.output.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
