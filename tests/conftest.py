"""Shared helpers: tiny real models, a oneshot runner, and a brute-force scorer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from llmcompressor import oneshot

from tamp_modifier.calibration_data import collate_rows
from tamp_modifier.testing.synthetic import build_tiny_model, save_tiny_model
from tamp_modifier.text_decoder import language_linears, text_decoder_layer_class

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run_oneshot(model, tokenizer, dataset, recipe, output_dir=None, **kwargs):
    """oneshot with the arguments a vision-language model needs offline."""
    args = dict(
        num_calibration_samples=len(dataset),
        shuffle_calibration_samples=False,
        max_seq_length=4096,
        data_collator=collate_rows,
        sequential_targets=[text_decoder_layer_class(model)],
    )
    args.update(kwargs)
    return oneshot(
        model=model, processor=tokenizer, dataset=dataset, recipe=recipe,
        output_dir=None if output_dir is None else str(output_dir), **args,
    )


@pytest.fixture
def tiny(tmp_path):
    """Build a tiny model of a family, with its config (and weights) in a folder."""

    def make(family="llava", weights=False, **kwargs):
        model = build_tiny_model(family, **kwargs)
        folder = tmp_path / f"dense-{family}"
        tokenizer = save_tiny_model(model, folder, weights=weights)
        return model, tokenizer, folder

    return make


def zero_fraction(module):
    return (module.weight == 0).float().mean().item()


def brute_force_scores(model, dataset, modalities: dict[str, list[int]]):
    """The spec's DAS layer score: the mean of ``brute_force_terms``."""
    return {n: sum(t.values()) / len(t) for n, t in brute_force_terms(model, dataset, modalities).items()}


def brute_force_terms(model, dataset, modalities: dict[str, list[int]]):
    """The spec's DAS terms per layer (intra ``m``, cross ``a|b``), from full pairwise
    distance matrices (float64), each averaged over the samples that have it.

    Runs the dense model sample by sample with plain forward hooks: independent
    of llm-compressor's pipeline and of tamp_modifier's streaming formulas.
    """
    names = ["text", *modalities]
    linears = language_linears(model)
    sums = {n: {} for n in linears}
    captured = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, out.detach()))
        for n, m in linears.items()
    ]
    try:
        for row in dataset:
            with torch.no_grad():
                model(**{k: v for k, v in row.items()})
            ids = row["input_ids"][0]
            keep = row["attention_mask"][0].bool()
            labels = torch.zeros_like(ids)
            for k, token_ids in enumerate(modalities.values(), start=1):
                labels[torch.isin(ids, torch.tensor(token_ids))] = k
            for n, out in captured.items():
                z = out[0][keep].double()
                z = z / z.norm(dim=-1, keepdim=True)
                dist = 1 - z @ z.T
                lab = labels[keep]
                groups = {m: (lab == k).nonzero().flatten() for k, m in enumerate(names)}
                for m, idx in groups.items():
                    if len(idx) >= 2:
                        block = dist[idx][:, idx]
                        value = (block.sum() - block.diagonal().sum()) / (len(idx) * (len(idx) - 1))
                        sums[n].setdefault(m, []).append(value.item())
                for a, b in itertools.combinations(names, 2):
                    if len(groups[a]) and len(groups[b]):
                        sums[n].setdefault(f"{a}|{b}", []).append(dist[groups[a]][:, groups[b]].mean().item())
    finally:
        for h in hooks:
            h.remove()
    return {n: {term: sum(v) / len(v) for term, v in terms.items()} for n, terms in sums.items()}


def assert_reloads_to_the_same_logits(model, folder, row):
    """The saved (possibly quantized) checkpoint reloads with transformers to finite logits
    equal to the in-memory model's on one calibration ``row``."""
    batch = {k: torch.as_tensor(v) for k, v in row.items()}
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = type(model).from_pretrained(folder, attn_implementation="eager")
        reloaded = reloaded(**batch).logits
    assert torch.isfinite(reloaded).all()
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-5)


def assert_reloads_equal(model, folder):
    """The saved checkpoint reloads with transformers to the in-memory weights."""
    mine, theirs = model.state_dict(), type(model).from_pretrained(folder).state_dict()
    assert set(mine) == set(theirs)
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def hooks(model) -> dict:
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()}


def stage1_only(model, batch):
    """Token pruning's stage 1 alone on ``batch``: last-position logits, 4 greedy tokens, and the
    per-row counts; the model restored afterwards."""
    from tamp_modifier.token_pruning import disable_token_pruning, enable_token_pruning

    pruner = enable_token_pruning(model, stage2=False)
    try:
        got = logits(model, batch, logits_to_keep=1)[:, -1]
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        counts = list(pruner.last)
    finally:
        disable_token_pruning(model)
    return got, gen, counts
