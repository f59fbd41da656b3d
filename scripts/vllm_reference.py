"""Write the demo questions and transformers' answers that ``vllm_check.py`` compares vLLM with.

Runs in the project's environment (transformers 5.17, compressed-tensors 0.19):

    python scripts/vllm_reference.py --output DIR [--per-family N] CHECKPOINT [CHECKPOINT ...]

``CHECKPOINT`` is a demo checkpoint folder (``tamp-prune`` output, or ``demo`` for the shipped
dense model). Each is reloaded with transformers, as a user would, and answers ``N`` held-out
questions per task family greedily over the whole vocabulary. Written to ``DIR``:
``reference.json`` (questions, chat messages, each checkpoint's answers) and the images as PNG
files, so the vLLM side needs nothing of this project.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR")
    parser.add_argument("--per-family", type=int, default=30, metavar="N")
    args = parser.parse_args(argv)
    from tamp_modifier.demo.model import demo_model_path

    folders = {}
    for given in args.checkpoints:
        folder = demo_model_path() if given == "demo" else Path(given).resolve()
        if not (folder / "config.json").is_file():
            parser.error(f"{given} is not a checkpoint folder (no config.json)")
        folders[given] = folder

    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

    from tamp_modifier.demo.evaluate import answer_questions
    from tamp_modifier.demo.tasks import make_split

    questions = make_split("eval", args.per_family)
    args.output.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, q in enumerate(questions):
        image = None
        if q.image is not None:
            image = f"image_{i:04d}.png"
            Image.fromarray(q.image).save(args.output / image)  # PNG: lossless, the pixels vLLM gets
        rows.append({"family": q.family, "prompt": q.prompt, "image": image, "truth": q.answer})

    checkpoints = []
    for given, folder in folders.items():
        name = "demo (dense)" if given == "demo" else folder.name
        model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        answers = answer_questions(model, tokenizer, questions, progress=f"{name} in transformers")
        checkpoints.append({"name": name, "path": str(folder), "answers": answers})
        right = sum(a == q.answer for a, q in zip(answers, questions))
        print(f"vllm_reference: {name}: {right}/{len(questions)} right in transformers", flush=True)
    reference = {"questions": rows, "checkpoints": checkpoints}
    (args.output / "reference.json").write_text(json.dumps(reference, indent=1))
    print(f"vllm_reference: {len(questions)} questions x {len(checkpoints)} checkpoints -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
