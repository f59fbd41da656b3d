"""Train the demo model from scratch on the generated task suite (CPU or GPU).

    python -m tamp_modifier.demo.train --output demo-model      # ~8 min on 2 cores

Two phases, because what the vision tower must learn is what takes the time:
1. the vision tower alone, on labels read off each image (per patch: colour,
   shape, quadrant; per image: object count, digit), through small heads;
2. the whole model on the questions (loss on the answer token only), with the
   same auxiliary losses kept on at a lower weight.
The auxiliary heads are thrown away; the saved checkpoint is a plain
``LlavaForConditionalGeneration`` with its tokenizer. Same seed and machine:
same weights. The dense accuracy per family on the evaluation split is written
to ``accuracy.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from tamp_modifier.demo.evaluate import evaluate
from tamp_modifier.checkpoint import rename_saved_weights
from tamp_modifier.demo.model import (
    build_demo_model,
    build_demo_tokenizer,
    pixel_values,
    prompt_batch,
    save_demo_processor,
)
from tamp_modifier.demo.tasks import (
    CELL,
    COLOURS,
    DIGITS,
    GRID,
    MAX_OBJECTS,
    SHAPE_MASKS,
    SHAPES,
    make_split,
)

__all__ = ["image_labels", "train_demo_model", "main"]

_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.int16)  # [4, 3]


def image_labels(image: np.ndarray, digit: str | None) -> dict[str, np.ndarray]:
    """Auxiliary labels read off a drawn image.

    Per patch (row-major, 64): ``colour`` 0 none or 1 + index in COLOURS;
    ``shape`` 0 none, 1 + index in SHAPES, or 5 ink that is no shape (digit
    strokes). Per image: ``count`` of shapes (-100 on digit images) and
    ``digit`` (-100 on scene images).
    """
    cells = image.reshape(GRID, CELL, GRID, CELL, 3).transpose(0, 2, 1, 3, 4)
    cells = cells.reshape(GRID * GRID, CELL, CELL, 3)
    ink = cells.any(-1)  # [64, 8, 8]
    colour = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    for p in np.flatnonzero(ink.any((1, 2))):
        pixel = cells[p][ink[p]][0].astype(np.int16)
        colour[p] = 1 + int(np.abs(_COLOUR_RGB - pixel).sum(1).argmin())
        stamp = ink[p, 1:7, 1:7]
        matches = [i for i, s in enumerate(SHAPES) if np.array_equal(stamp, SHAPE_MASKS[s])]
        shape[p] = 1 + matches[0] if matches and ink[p].sum() == stamp.sum() else 1 + len(SHAPES)
    count = int((shape > 0).sum()) if digit is None else -100
    return {"colour": colour, "shape": shape, "count": np.int64(count),
            "digit": np.int64(DIGITS.index(digit) if digit is not None else -100)}


class _AuxHeads(torch.nn.Module):
    """Linear heads on the vision tower's last hidden states (discarded after training)."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(COLOURS))
        self.shape = torch.nn.Linear(width, 2 + len(SHAPES))
        self.quadrant = torch.nn.Linear(width, 4)
        self.count = torch.nn.Linear(width, MAX_OBJECTS + 1)
        self.digit = torch.nn.Linear(width, len(DIGITS))

    def loss(self, hidden: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        patches, pooled = hidden[:, 1:], hidden[:, 1:].mean(1)  # token 0 is CLS
        rows = torch.arange(GRID * GRID, device=hidden.device) // GRID
        cols = torch.arange(GRID * GRID, device=hidden.device) % GRID
        quadrant = ((rows >= GRID // 2) * 2 + (cols >= GRID // 2)).expand(len(hidden), -1)
        terms = [
            F.cross_entropy(self.colour(patches).flatten(0, 1), labels["colour"].flatten()),
            F.cross_entropy(self.shape(patches).flatten(0, 1), labels["shape"].flatten()),
            F.cross_entropy(self.quadrant(patches).flatten(0, 1), quadrant.flatten()),
        ]
        for name in ("count", "digit"):
            if (labels[name] >= 0).any():
                terms.append(F.cross_entropy(getattr(self, name)(pooled), labels[name], ignore_index=-100))
        return sum(terms)


def _stack_labels(questions) -> dict[str, torch.Tensor]:
    rows = [image_labels(q.image, q.answer if q.family == "digit" else None)
            for q in questions if q.image is not None]
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_demo_model(
    *,
    vision_steps: int = 200,
    steps: int = 800,
    batch_size: int = 48,
    lr: float = 2e-3,
    aux_weight: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
):
    """Train the demo model; returns ``(model, tokenizer)`` (float32, eval mode)."""
    torch.manual_seed(seed)
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(seed).to(device).train()
    tower = model.model.vision_tower
    heads = _AuxHeads(tower.config.hidden_size).to(device)

    # Phase 1: the vision tower alone, on what can be read off the images.
    images = make_split("train", max(1, vision_steps * batch_size // 5), seed, families=(
        "count", "digit", "colour", "shape", "position"))
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in tqdm(range(vision_steps), desc="vision tower", disable=not progress):
        chunk = images[step * batch_size : (step + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, vision_steps, 20)
        hidden = tower(pixel_values([q.image for q in chunk]).to(device)).last_hidden_state
        loss = heads.loss(hidden, {k: v.to(device) for k, v in _stack_labels(chunk).items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    # Phase 2: everything, on the questions, auxiliary losses kept on.
    questions = make_split("train", max(1, steps * batch_size // 6) + 1, seed + 1)
    captured = {}
    hook = tower.register_forward_hook(lambda _m, _a, out: captured.__setitem__("h", out.hidden_states[-1]))
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    bar = tqdm(range(steps), desc="whole model", disable=not progress)
    running = None
    for step in bar:
        chunk = questions[step * batch_size : (step + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps, 40)
        batch = {k: v.to(device) for k, v in prompt_batch(chunk, tokenizer).items()}
        answers = torch.tensor(tokenizer.convert_tokens_to_ids([q.answer for q in chunk]), device=device)
        captured.clear()
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, answers)
        if "h" in captured:
            labels = {k: v.to(device) for k, v in _stack_labels(chunk).items()}
            loss = loss + aux_weight * heads.loss(captured["h"], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc = (logits.argmax(-1) == answers).float().mean().item()
        running = acc if running is None else 0.95 * running + 0.05 * acc
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{running:.2f}")
    hook.remove()
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for the trained checkpoint")
    parser.add_argument("--steps", type=int, default=800, help="whole-model steps")
    parser.add_argument("--vision-steps", type=int, default=200, help="vision-tower-only steps")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-per-family", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        parser.error(f"{output} exists and is not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    model, tokenizer = train_demo_model(
        vision_steps=args.vision_steps, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device,
    )
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, tokenizer, make_split("eval", args.eval_per_family))
    logger.info(f"trained in {seconds:.0f} s; dense accuracy: "
                + ", ".join(f"{f} {a:.1%}" for f, a in accuracy.items()))
    # Written beside the target, then renamed: a failed run leaves no half checkpoint.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.to("cpu").save_pretrained(tmp)
        rename_saved_weights(model, tmp)  # the hub's CLIP naming, which vLLM loads
        save_demo_processor(tokenizer, tmp)  # tokenizer, image processor, chat template
        (tmp / "accuracy.json").write_text(json.dumps({
            "eval_per_family": args.eval_per_family, "accuracy": accuracy,
            "train_seconds": round(seconds, 1), "settings": vars(args) | {"device": args.device},
        }, indent=2))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(accuracy, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
