"""Stage-1 visual-token pruning on small Qwen-VL models: accuracy and fidelity against the share of
visual tokens kept, for our CLS-free scores and two baselines.

No Qwen-VL checkpoint can be downloaded here, so two settings: (1) with ``--train-steps N``, a
small Qwen2-VL (hidden 128, 4 decoder layers, tower width 64 with 4 blocks, 4-px patches) trained
from scratch on the demo's image questions (``demo.tasks``; answer = next token), then measured
on held-out questions: ACCURACY; (2) without, random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models of
the same sizes: FIDELITY only. Each prompt is ``<s> <vision_start> <image> x 64 <vision_end>
question`` (a 64 x 64 demo image: 8 x 8 merged tokens, one per 8-px cell). For each share s of
the image's tokens the same k = round(s * 64) tokens are kept by

- ``received_attention``: our default score (the mean attention a token's patches receive in the
  tower's last block), top k (the pruner with min_tokens = max_tokens = k);
- ``mean_cosine``: cosine to the image's mean token, top k;
- ``random``: k tokens drawn uniformly (seeded);
- ``stride``: k tokens evenly spaced in raster order (a uniform spatial subsample),

and the unmodified language model runs on the kept tokens with their original M-RoPE positions
(the construction the tests check against the pruner). Reported per share: accuracy (greedy next
token = answer), agreement of the greedy next token with the unpruned model's, and the mean
KL(unpruned || pruned) at the answer position. Also the knee rule (the default, adaptive k) with
the share it chose and random at the same per-prompt k, and both stages with every default.

    python benchmarks/token_pruning_qwen.py --prompts 120                      # random models: ~3 min
    python benchmarks/token_pruning_qwen.py --train-steps 1000 --prompts 240   # train + measure: ~20 min
    python benchmarks/token_pruning_qwen.py --report-only                      # the md from the json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from loguru import logger

from tamp_modifier.demo.tasks import IMAGE_FAMILIES, make_split, vocabulary
from tamp_modifier.testing.synthetic import build_tiny_model
from tamp_modifier.token_pruning import disable_token_pruning, enable_token_pruning, keep_mask

RESULTS = Path(__file__).resolve().parent / "results"
BOS = 1
WORDS = {w: 3 + i for i, w in enumerate(vocabulary())}  # ids 3.. (0 pad, 1 <s>; the top 4 are Qwen's markers)
SHARES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
METHODS = ("received_attention", "mean_cosine", "random", "stride")
MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def patchify(image: np.ndarray, model) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[H, W, 3]`` uint8 image as Qwen-VL pixel rows: patches in the merger's block-major order
    (each 2 x 2 block of patches consecutive), each row ``(C, T, p, p)`` with the frame repeated
    over the temporal patch, as the Qwen image processor lays them out; and its ``[1, 3]`` grid."""
    v = model.config.vision_config
    p, m, tp = v.patch_size, v.spatial_merge_size, v.temporal_patch_size
    x = torch.from_numpy(image).float().permute(2, 0, 1) / 127.5 - 1.0  # [C, H, W] in [-1, 1]
    c, height, width = x.shape
    h, w = height // p, width // p
    x = x.view(c, h // m, m, p, w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # hb, wb, mi, mj, C, p, p
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, tp, -1, -1)  # the frame repeated in time
    return x.reshape(h * w, c * tp * p * p), torch.tensor([[1, h, w]])


def prompt(model, image: np.ndarray, text: list[int]) -> dict:
    """One prompt ``<s> <vision_start> <image> x 64 <vision_end> text`` as the model's inputs."""
    cfg = model.config
    pixels, grid = patchify(image, model)
    n = int(grid.prod()) // cfg.vision_config.spatial_merge_size**2
    ids = [BOS, cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id, *text]
    ids = torch.tensor(ids, dtype=torch.long)[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "mm_token_type_ids": (ids == cfg.image_token_id).long(),
    }


class Reference:
    """The unmodified model's own pieces for one prompt: embeddings with the image features in place
    and M-RoPE ids; ``logits(cols)`` runs its language model on those columns only."""

    def __init__(self, model, batch):
        mm = model.model
        self.model = model
        with torch.no_grad():
            embeds = mm.get_input_embeddings()(batch["input_ids"])
            out = mm.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
            self.image = batch["input_ids"][0] == model.config.image_token_id
            self.embeds = embeds.masked_scatter(self.image[None, :, None], torch.cat(list(out.pooler_output)))
            self.deepstack = getattr(out, "deepstack_features", None)
            self.pos, _ = mm.get_rope_index(
                batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"]
            )
        self.image_cols = self.image.nonzero()[:, 0]

    def logits(self, cols: torch.Tensor) -> torch.Tensor:
        extra = {}
        if self.deepstack is not None:
            kept = torch.isin(self.image_cols, cols)
            extra = dict(
                visual_pos_masks=self.image[cols][None],
                deepstack_visual_embeds=[f[kept] for f in self.deepstack],
            )
        with torch.no_grad():
            h = self.model.model.language_model(
                inputs_embeds=self.embeds[:, cols], position_ids=self.pos[:, :, cols], **extra
            ).last_hidden_state
            return self.model.lm_head(h[:, -1])[0].float()

    def with_image_tokens(self, kept_image: torch.Tensor) -> torch.Tensor:
        """Every text column plus the image columns ``kept_image`` (indices among the image tokens)."""
        cols = torch.cat([(~self.image).nonzero()[:, 0], self.image_cols[kept_image]])
        return cols.sort().values


def kept_by_pruner(model, batch, ref: Reference, **options) -> torch.Tensor:
    """The image tokens (indices among them) the pruner keeps, from a real pruned forward."""
    pruner = enable_token_pruning(model, stage2=False, **options)
    try:
        with torch.no_grad():
            model(**batch, logits_to_keep=1)
    finally:
        disable_token_pruning(model)
    return torch.isin(ref.image_cols, torch.tensor(pruner.last[0].kept_stage1)).nonzero()[:, 0]


def scores_of(model, batch, similarity: str) -> torch.Tensor:
    """Stage-1 scores of the (one) image: top k of them is what the pruner keeps with
    min_tokens = max_tokens = k (checked once per prompt below)."""
    pruner = enable_token_pruning(model, stage2=False, similarity=similarity)
    try:
        return pruner.stage1_scores(**batch)[0]
    finally:
        disable_token_pruning(model)


def fidelity(full: torch.Tensor, pruned: torch.Tensor) -> tuple[bool, float]:
    logp, logq = full.log_softmax(-1), pruned.log_softmax(-1)
    return bool(full.argmax() == pruned.argmax()), float((logp.exp() * (logp - logq)).sum())


def build(family: str, seed: int = 0, attn: str = "eager"):
    return build_tiny_model(
        family,
        hidden_size=128,
        intermediate_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=64,
        vision_hidden_size=64,
        vision_layers=4,
        seed=seed,
        attn_implementation=attn,
    )


def encode(question) -> list[int]:
    return [WORDS[w] for w in question.prompt.split()]


def measure(model, questions, seed: int) -> dict:
    """Per share and method: fidelity to the unpruned model and, where ``questions`` carry answers the
    model was trained on, accuracy. Also the knee (adaptive share) and the full default pipeline."""
    rng = np.random.default_rng(seed)
    rows = {m: {s: [] for s in SHARES} for m in METHODS}
    knee = {"share": [], "received_attention": [], "random": []}
    pipeline = {"rows": [], "layer_share": [], "input_share": []}
    for q in questions:
        batch = prompt(model, q.image, encode(q))
        answer = WORDS[q.answer]
        ref = Reference(model, batch)
        full = ref.logits(torch.arange(batch["input_ids"].shape[1]))

        def judge(pruned):
            agree, kl = fidelity(full, pruned)
            return agree, kl, bool(pruned.argmax() == answer), bool(full.argmax() == answer)

        n = len(ref.image_cols)
        scores = {
            "received_attention": scores_of(model, batch, "attention"),
            "mean_cosine": scores_of(model, batch, "cosine"),
        }
        k = max(1, round(SHARES[1] * n))  # the top k of the scores is the pruner's own choice
        assert torch.equal(
            kept_by_pruner(model, batch, ref, min_tokens=k, max_tokens=k),
            keep_mask(scores["received_attention"], min_tokens=k, max_tokens=k).nonzero()[:, 0],
        )
        for share in SHARES:
            k = max(1, round(share * n))
            picks = {m: keep_mask(s, min_tokens=k, max_tokens=k).nonzero()[:, 0] for m, s in scores.items()}
            picks["random"] = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)))
            picks["stride"] = torch.from_numpy(np.unique(np.linspace(0, n - 1, k).round().astype(np.int64)))
            for method, kept in picks.items():
                assert len(kept) == k, (method, len(kept), k)
                rows[method][share].append(judge(ref.logits(ref.with_image_tokens(kept))))
        kept = kept_by_pruner(model, batch, ref)  # the knee: the default, adaptive count
        knee["share"].append(len(kept) / n)
        knee["received_attention"].append(judge(ref.logits(ref.with_image_tokens(kept))))
        rand = torch.from_numpy(np.sort(rng.choice(n, len(kept), replace=False)))
        knee["random"].append(judge(ref.logits(ref.with_image_tokens(rand))))
        pruner = enable_token_pruning(model)  # both stages, every default
        try:
            with torch.no_grad():
                pruned = model(**batch, logits_to_keep=1).logits[0, -1].float()
        finally:
            disable_token_pruning(model)
        pipeline["rows"].append(judge(pruned))
        pipeline["layer_share"].append(pruner.last[0].layer_share())
        pipeline["input_share"].append(pruner.last[0].input_share())

    def summary(r):
        r = np.array(r, dtype=np.float64)
        return {"agreement": r[:, 0].mean(), "kl": r[:, 1].mean(), "accuracy": r[:, 2].mean()}

    return {
        "prompts": len(questions),
        "visual_tokens": n,
        "unpruned_accuracy": float(np.mean([r[3] for r in knee["random"]])),
        "by_share": {m: {str(s): summary(rows[m][s]) for s in SHARES} for m in METHODS},
        "knee": {
            "mean_share": float(np.mean(knee["share"])),
            "received_attention": summary(knee["received_attention"]),
            "random_same_k": summary(knee["random"]),
        },
        "default_pipeline": {
            **summary(pipeline["rows"]),
            "layer_share": float(np.mean(pipeline["layer_share"])),
            "input_share": float(np.mean(pipeline["input_share"])),
        },
    }


def batch_prompts(model, questions) -> tuple[dict, torch.Tensor]:
    """Left-padded training batch of ``questions`` and their answer ids."""
    rows = [prompt(model, q.image, encode(q)) for q in questions]
    width = max(r["input_ids"].shape[1] for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r["input_ids"].shape[1] :] = r["input_ids"][0]
    batch = {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]),
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
    }
    return batch, torch.tensor([WORDS[q.answer] for q in questions])


def train(steps: int, batch_size: int, seed: int, lr: float = 2e-3):
    """A small Qwen2-VL trained from scratch on the demo's image questions (answer = next token)."""
    torch.manual_seed(seed)
    model = build("qwen2_vl", seed, attn="sdpa").train()  # SDPA trains ~10x faster on CPU than eager
    questions = make_split(
        "train", steps * batch_size // len(IMAGE_FAMILIES) + 1, seed, families=IMAGE_FAMILIES
    )
    order = np.random.default_rng(seed).permutation(len(questions))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start, running = time.time(), None
    for step in range(steps):
        chunk = [questions[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        warm = min(1.0, (step + 1) / 40)
        for group in opt.param_groups:  # warm-up, then cosine to a tenth
            group["lr"] = lr * warm * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        batch, answers = batch_prompts(model, chunk)
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = float((logits.argmax(-1) == answers).float().mean())
        running = acc if running is None else 0.95 * running + 0.05 * acc
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                f"step {step}: loss {loss.item():.3f}, running accuracy {running:.2f}, "
                f"{time.time() - start:.0f} s"
            )
    model.set_attn_implementation("eager")  # what stage 2 reads (the weights are the same)
    return model.eval(), time.time() - start


def table(r: dict, key: str) -> list[str]:
    lines = ["| share kept | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for s in SHARES:
        cells = []
        for m in METHODS:
            c = r["by_share"][m][str(s)]
            cells.append(
                f"{c['accuracy']:.1%} (agree {c['agreement']:.0%})"
                if key == "accuracy"
                else f"{c['agreement']:.1%} / {c['kl']:.4f}"
            )
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    k, p = r["knee"], r["default_pipeline"]
    if key == "accuracy":
        agreements = [r["by_share"][m][str(s)]["agreement"] for m in METHODS for s in SHARES]
        if min(agreements) == 1.0:  # the same answer whatever is kept: the image is not read at all
            lines += [
                "",
                "**Every selection at every share gives the unpruned model's answer: this model "
                "answers from the question alone (it did not learn to read the image in this training "
                "budget), so these figures say nothing about the scores.**",
            ]
        lines += [
            "",
            f"Unpruned accuracy {r['unpruned_accuracy']:.1%}. Knee (default, adaptive): mean share "
            f"{k['mean_share']:.1%}, received attention {k['received_attention']['accuracy']:.1%}, random at "
            f"the same k {k['random_same_k']['accuracy']:.1%}. Both stages, every default: "
            f"{p['accuracy']:.1%} at {p['input_share']:.1%} of the tokens at the input, "
            f"{p['layer_share']:.1%} averaged over layers.",
        ]
    else:
        lines += [
            "",
            f"Knee (default, adaptive): mean share {k['mean_share']:.1%}; received attention "
            f"{k['received_attention']['agreement']:.1%} / {k['received_attention']['kl']:.4f}, random at "
            f"the same k {k['random_same_k']['agreement']:.1%} / {k['random_same_k']['kl']:.4f}. Both "
            f"stages, every default: {p['agreement']:.1%} / {p['kl']:.4f} at {p['input_share']:.1%} of the "
            f"tokens at the input, {p['layer_share']:.1%} averaged over layers.",
        ]
    return lines


def markdown(results: dict) -> str:
    lines = [
        "# Token pruning on small Qwen-VL models: accuracy and fidelity against the share kept",
        "",
        "Same k visual tokens of 64 per image for every method (see the docstring of "
        "`benchmarks/token_pruning_qwen.py`); the unmodified language model runs on the kept tokens at "
        "their original M-RoPE positions.",
        "",
    ]
    if "accuracy" in results:
        a = results["accuracy"]
        lines += [
            f"## Trained Qwen2-VL, demo image tasks ({a['prompts']} eval questions)",
            "",
            f"`{a['command']}`: trained {a['train_steps']} steps x {a['batch_size']} from scratch in "
            f"{a['train_seconds']:.0f} s, measured in {a['seconds']:.0f} s. Hidden 128, 4 decoder layers, "
            "tower width 64, 4 blocks, 4 px patches (one 8 px cell of the image = one merged token). "
            "Cells: accuracy (greedy next token = answer), and agreement with the unpruned model.",
            "",
            *table(a, "accuracy"),
            "",
        ]
    if "fidelity" in results:
        f = results["fidelity"]
        lines += [
            "## Random Qwen-VL models: fidelity only",
            "",
            f"`{f['command']}` ({f['seconds']:.0f} s for all models). Random weights of the same sizes, demo "
            "images, the demo questions as text. Cells: greedy next-token agreement with the unpruned model "
            "/ "
            "mean KL(unpruned || pruned) at the answer position. Random weights: how much a selection "
            "disturbs the model, not how well a trained one would answer.",
            "",
        ]
        for family, r in f["models"].items():
            lines += [f"### {family} ({r['prompts']} prompts)", "", *table(r, "fidelity"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train a Qwen2-VL this many steps and measure accuracy (0: random models, fidelity)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--prompts", type=int, default=120, help="questions per model (spread over the families)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="rewrite the md from the json")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(MODELS),
        choices=MODELS,
        help="random models to measure (without --train-steps)",
    )
    args = parser.parse_args(argv)
    # one thread: on a 2-core machine shared with other jobs, two OpenMP threads spin against each
    # other (measured: 0.8 s a training step with one thread, 2.5-7 s with two)
    torch.set_num_threads(1)
    command = "python benchmarks/token_pruning_qwen.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    path = RESULTS / "token_pruning_qwen.json"
    if args.report_only:
        (RESULTS / "token_pruning_qwen.md").write_text(markdown(json.loads(path.read_text())))
        return 0
    per_family = max(1, args.prompts // len(IMAGE_FAMILIES))
    questions = make_split("eval", per_family, args.seed, families=IMAGE_FAMILIES)
    start = time.time()
    if args.train_steps:
        model, seconds = train(args.train_steps, args.batch_size, args.seed)
        start = time.time()
        part = (
            "accuracy",
            dict(
                measure(model, questions, args.seed),
                command=command.strip(),
                train_steps=args.train_steps,
                batch_size=args.batch_size,
                train_seconds=seconds,
            ),
        )
    else:
        models = {family: measure(build(family), questions, args.seed) for family in args.models}
        part = "fidelity", {"models": models, "command": command.strip()}
    part[1]["seconds"] = time.time() - start
    RESULTS.mkdir(exist_ok=True)
    # read just before writing: the two parts may be measured by two runs at once
    results = json.loads(path.read_text()) if path.exists() else {}
    results[part[0]] = part[1]
    path.write_text(json.dumps(results, indent=1, default=float))
    (RESULTS / "token_pruning_qwen.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
