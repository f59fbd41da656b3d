"""Train the demo model from scratch: English text, then images, then the tasks (CPU or GPU).

    python -m tamp_modifier.demo.train --output demo-model      # ~16 min on 2 cores

Three phases, in the order real multimodal LLMs are made:
0. the language model alone, as a next-word model on English (``demo.corpus``), so
   it has a general ability that pruning can damage, as real LLMs do;
1. the vision tower alone, on labels read off each image: per patch colour, shape,
   quadrant; on the CLS token which colours and shapes the image holds, the object
   count and the digit, so that CLS attends to the objects (what token pruning's
   stage 1 relies on), through small heads;
2. the whole model on the questions (loss on the answer token only), with the
   auxiliary losses kept on at a lower weight and a batch of English text in every
   step, so the language model keeps its text ability while it learns the tasks.
No weight decay: it would make small weights unimportant, which real models' are not.
The auxiliary heads are thrown away; the saved checkpoint is a plain
``LlavaForConditionalGeneration`` with its tokenizer. Same seed and machine:
same weights. The dense accuracy per family on the evaluation split, and the
held-out text loss, are written to ``accuracy.json`` beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from tamp_modifier.demo.corpus import corpus_fingerprint, corpus_words, text_windows
from tamp_modifier.demo.evaluate import evaluate
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
    FAMILIES,
    GRID,
    MAX_OBJECTS,
    SHAPE_MASKS,
    SHAPES,
    make_split,
)
from tamp_modifier.deploy.checkpoint import rename_saved_weights

__all__ = ["corpus_ids", "held_out_text_loss", "image_labels", "train_demo_model", "main"]

_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.int16)  # [4, 3]


def image_labels(image: np.ndarray, digit: str | None) -> dict[str, np.ndarray]:
    """Auxiliary labels read off a drawn image.

    Per patch (row-major, 64): ``colour`` 0 none or 1 + index in COLOURS;
    ``shape`` 0 none, 1 + index in SHAPES, or 5 ink that is no shape (digit
    strokes). Per image: ``count`` of shapes (-100 on digit images), ``digit``
    (-100 on scene images), and ``present``, 8 flags: which of COLOURS, then which
    of SHAPES, some object of the image has (all 0 on digit images).
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
    objects = (shape > 0) & (shape <= len(SHAPES))
    present = np.zeros(len(COLOURS) + len(SHAPES), np.float32)
    present[colour[objects] - 1] = 1
    present[len(COLOURS) + shape[objects] - 1] = 1
    count = int(objects.sum()) if digit is None else -100
    return {"colour": colour, "shape": shape, "count": np.int64(count),
            "digit": np.int64(DIGITS.index(digit) if digit is not None else -100), "present": present}


class _AuxHeads(torch.nn.Module):
    """Linear heads on the vision tower's last hidden states (discarded after training):
    per patch colour, shape and quadrant; on the CLS token (token 0) the count, the
    digit and which colours and shapes are present."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(COLOURS))
        self.shape = torch.nn.Linear(width, 2 + len(SHAPES))
        self.quadrant = torch.nn.Linear(width, 4)
        self.count = torch.nn.Linear(width, MAX_OBJECTS + 1)
        self.digit = torch.nn.Linear(width, len(DIGITS))
        self.present = torch.nn.Linear(width, len(COLOURS) + len(SHAPES))

    def loss(self, hidden: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        cls, patches = hidden[:, 0], hidden[:, 1:]
        rows = torch.arange(GRID * GRID, device=hidden.device) // GRID
        cols = torch.arange(GRID * GRID, device=hidden.device) % GRID
        quadrant = ((rows >= GRID // 2) * 2 + (cols >= GRID // 2)).expand(len(hidden), -1)
        terms = [
            F.cross_entropy(self.colour(patches).flatten(0, 1), labels["colour"].flatten()),
            F.cross_entropy(self.shape(patches).flatten(0, 1), labels["shape"].flatten()),
            F.cross_entropy(self.quadrant(patches).flatten(0, 1), quadrant.flatten()),
            F.binary_cross_entropy_with_logits(self.present(cls), labels["present"]),
        ]
        for name in ("count", "digit"):
            if (labels[name] >= 0).any():
                terms.append(F.cross_entropy(getattr(self, name)(cls), labels[name], ignore_index=-100))
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


# Share of the corpus (its end) never trained on: the held-out text loss is measured there.
HELD_OUT = 0.05
# Phase 2 draws these families twice as often: finding one object among several
# (binding) and reading where it is (position) are what the model learns last.
# (Binding drawn 4x as often, with 2,200 steps, ended lower: 66% against 79.5%.)
_EXTRA = ("binding", "position")


def corpus_ids(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` token ids of the corpus (words outside the vocabulary as ``<unk>``)."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(corpus_words()), dtype=torch.long)
    cut = int(len(ids) * (1 - HELD_OUT))
    return ids[:cut], ids[cut:]


def _update(opt, params, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def spread_norm_gains(language_model, spread: float, seed: int) -> None:
    """Start every decoder layer's RMSNorm gains log-normal (median 1, log-std ``spread``).

    Real LLMs reach training with a few input channels whose scale is tens of times
    the median (outlier features); a 15-minute training from gains of 1 does not grow
    them (max / median 1.6 to 2.0 here). Starting from uneven gains gives the
    model uneven channel scales that training then builds on, which is what makes
    a weight's magnitude a poor guide to its importance on real models.
    """
    if spread <= 0:
        return
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in language_model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                gains = torch.exp(spread * torch.randn(norm.weight.shape, generator=generator))
                norm.weight.copy_(gains.to(norm.weight))


def _text_loss(model, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows, labels=windows).loss


@torch.no_grad()
def held_out_text_loss(model, tokenizer, length: int = 128) -> float:
    """Mean next-word loss (nats) on the held-out corpus, in consecutive windows."""
    _, held = corpus_ids(tokenizer)
    device = next(model.parameters()).device
    step = length - 1
    rows = [torch.cat([torch.tensor([tokenizer.bos_token_id]), held[s : s + step]])
            for s in range(0, len(held) - step, step)]
    losses = [_text_loss(model, torch.stack(rows[i : i + 32]).to(device)).item()
              for i in range(0, len(rows), 32)]
    return float(np.mean(losses))


def train_demo_model(
    *,
    text_steps: int = 600,
    vision_steps: int = 200,
    steps: int = 1500,
    batch_size: int = 48,
    text_batch: int = 16,
    text_length: int = 128,
    text_weight: float = 0.5,
    lr: float = 2e-3,
    aux_weight: float = 0.3,
    norm_gain_spread: float = 0.0,
    text_layers: int = 6,
    text_intermediate: int = 384,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
):
    """Train the demo model; returns ``(model, tokenizer)`` (float32, eval mode)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(seed, text_layers=text_layers, text_intermediate=text_intermediate)
    model = model.to(device).train()
    spread_norm_gains(model.model.language_model, norm_gain_spread, seed)
    tower = model.model.vision_tower
    heads = _AuxHeads(tower.config.hidden_size).to(device)
    text, _ = corpus_ids(tokenizer)

    def windows(batch: int) -> torch.Tensor:
        return text_windows(text, text_length, batch, rng, tokenizer.bos_token_id).to(device)

    # Phase 0: the language model alone, next word on English text.
    params = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(text_steps), desc="language model", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, text_steps, 30)
        # Twice phase 2's text batch: text is all it learns here.
        loss = _text_loss(model, windows(2 * text_batch))
        _update(opt, params, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    # Phase 1: the vision tower alone, on what can be read off the images.
    images = make_split("train", max(1, vision_steps * batch_size // 5), seed, families=(
        "count", "digit", "colour", "shape", "binding"))
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in tqdm(range(vision_steps), desc="vision tower", disable=not progress):
        chunk = images[step * batch_size : (step + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, vision_steps, 20)
        hidden = tower(pixel_values([q.image for q in chunk]).to(device)).last_hidden_state
        loss = heads.loss(hidden, {k: v.to(device) for k, v in _stack_labels(chunk).items()})
        _update(opt, params, loss)

    # Phase 2: everything, on the questions, auxiliary losses and English text kept on.
    mix = (*FAMILIES, *_EXTRA)
    questions = make_split("train", max(1, steps * batch_size // len(mix)) + 1, seed + 1, families=mix)
    captured = {}
    hook = tower.register_forward_hook(lambda _m, _a, out: captured.__setitem__("h", out.hidden_states[-1]))
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
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
        task_loss = F.cross_entropy(logits, answers)
        loss = task_loss
        if "h" in captured:
            labels = {k: v.to(device) for k, v in _stack_labels(chunk).items()}
            loss = loss + aux_weight * heads.loss(captured["h"], labels)
        if text_weight > 0:
            loss = loss + text_weight * _text_loss(model, windows(text_batch))
        _update(opt, params, loss)
        acc = (logits.argmax(-1) == answers).float().mean().item()
        running = acc if running is None else 0.95 * running + 0.05 * acc
        bar.set_postfix(loss=f"{task_loss.item():.3f}", acc=f"{running:.2f}")
    hook.remove()
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for the trained checkpoint")
    parser.add_argument("--text-steps", type=int, default=600, help="language-model-only steps on English")
    parser.add_argument("--vision-steps", type=int, default=200, help="vision-tower-only steps")
    parser.add_argument("--steps", type=int, default=1500, help="whole-model steps")
    parser.add_argument("--text-weight", type=float, default=0.5,
                        help="weight of the English text loss in the whole-model steps")
    parser.add_argument("--norm-gain-spread", type=float, default=0.0,
                        help="log-std of the decoder norms' initial gains (0: all 1)")
    parser.add_argument("--text-layers", type=int, default=6, help="language model depth")
    parser.add_argument("--text-intermediate", type=int, default=384, help="language model MLP width")
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
        text_steps=args.text_steps, vision_steps=args.vision_steps, steps=args.steps,
        batch_size=args.batch_size, text_weight=args.text_weight, norm_gain_spread=args.norm_gain_spread,
        text_layers=args.text_layers, text_intermediate=args.text_intermediate, lr=args.lr, seed=args.seed,
        device=args.device,
    )
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, tokenizer, make_split("eval", args.eval_per_family))
    text_loss = held_out_text_loss(model, tokenizer)
    logger.info(f"trained in {seconds:.0f} s; dense accuracy: "
                + ", ".join(f"{f} {a:.1%}" for f, a in accuracy.items())
                + f"; held-out text loss {text_loss:.3f} nats")
    # Written beside the target, then renamed: a failed run leaves no half checkpoint.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.to("cpu").save_pretrained(tmp)
        rename_saved_weights(model, tmp)  # the hub's CLIP naming, which vLLM loads
        save_demo_processor(tokenizer, tmp)  # tokenizer, image processor, chat template
        (tmp / "accuracy.json").write_text(json.dumps({
            "eval_per_family": args.eval_per_family, "accuracy": accuracy,
            "held_out_text_loss": round(text_loss, 4), "train_seconds": round(seconds, 1),
            "settings": vars(args) | {"device": args.device},
            # The corpus comes from the running Python: which text, to retrain the same weights.
            "corpus": {"source": "pydoc_data.topics", "fingerprint": corpus_fingerprint(),
                       "python": platform.python_version()},
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
