"""Serve a TAMP-pruned (and quantized) checkpoint with vLLM, and time it against dense.

Runs in its OWN environment, on an NVIDIA GPU: vllm 0.33 pins torch 2.14 and
compressed-tensors 0.17.0, which cannot share an environment with llmcompressor
0.14 (it pins compressed-tensors 0.19.0). Prune in the tamp-modifier environment,
serve from this one:

    python3 -m venv .venv-vllm && . .venv-vllm/bin/activate && pip install vllm==0.33.0
    python examples/serve_vllm.py Qwen2.5-VL-7B-Instruct-TAMP --dense Qwen/Qwen2.5-VL-7B-Instruct

or as an OpenAI-compatible server, with nothing of ours installed:

    vllm serve Qwen2.5-VL-7B-Instruct-TAMP --max-model-len 8192

What to expect: vLLM 0.33 has no sparse-weight kernels, so pruned weights run
through the dense (BF16) or quantized (FP8, INT8, 4-bit) kernels at the same
speed as an unpruned model of that format; quantization is what buys speed and
memory. For 2:4 speed, see tamp_modifier.semi_structured (torch's own kernels,
outside vLLM). The script prints prefill and decode throughput of each model
given, on the same prompts, so you can see it on your GPU.
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


def synthetic_images(count: int):
    """Images drawn here (coloured shapes), so the script needs no download."""
    from PIL import Image, ImageDraw

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    images = []
    for i in range(count):
        image = Image.new("RGB", (448, 448), "white")
        draw = ImageDraw.Draw(image)
        for k in range(1 + i % 4):
            x, y = 40 + 90 * k, 60 + 70 * (i % 3)
            draw.ellipse((x, y, x + 80, y + 80), fill=colours[(i + k) % len(colours)])
        images.append(image)
    return images


def requests(checkpoint: str, count: int):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    question = "How many circles are in the image, and what colours are they? Answer in one sentence."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in synthetic_images(count)]


def measure(checkpoint: str, prompts: int, max_tokens: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=checkpoint, max_model_len=max_model_len, limit_mm_per_prompt={"image": 1})
    batch = requests(checkpoint, prompts)
    llm.generate(batch[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up, CUDA graphs
    start = time.perf_counter()
    prefill = llm.generate(batch, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    full = llm.generate(batch, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    full_s = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in prefill)
    decoded = sum(len(o.outputs[0].token_ids) for o in full)
    print(f"  answer to the first image: {full[0].outputs[0].text.strip()[:120]!r}")
    del llm
    return {
        "prefill tok/s": prompt_tokens / prefill_s,
        "decode tok/s": (decoded - len(batch)) / max(full_s - prefill_s, 1e-9),
        "end-to-end s": full_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a pruned checkpoint with vLLM and time it")
    parser.add_argument("checkpoint", help="folder written by oneshot(output_dir=...) or tamp-prune")
    parser.add_argument("--dense", help="the unpruned model, to time the same prompts against")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=8192)
    args = parser.parse_args(argv)
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("vllm is not installed here: make a separate environment with `pip install vllm==0.33.0` "
                 "(it cannot share one with llmcompressor 0.14) and run this script there")
    if not torch.cuda.is_available():
        sys.exit("vLLM needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")

    results = {}
    for name in [args.checkpoint] + ([args.dense] if args.dense else []):
        describe(name)
        results[name] = measure(name, args.prompts, args.max_tokens, args.max_model_len)
    width = max(len(n) for n in results)
    print(f"\n{'model':<{width}}  {'prefill tok/s':>14}  {'decode tok/s':>13}  {'end-to-end s':>12}")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['prefill tok/s']:>14.0f}  {r['decode tok/s']:>13.0f}  "
              f"{r['end-to-end s']:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
