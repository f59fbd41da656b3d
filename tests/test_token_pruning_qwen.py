"""Token pruning on tiny real Qwen2-VL / Qwen2.5-VL / Qwen3-VL models: the unmodified model when
nothing is pruned, independent references (the tower's own attention probabilities, the unmodified
language model on hand-built inputs, a hand-written decoder loop) when tokens are pruned, refusals."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import hooks, logits, stage1_only
from transformers import AutoModelForImageTextToText

from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset
from tamp_modifier.token_pruning import disable_token_pruning, enable_token_pruning, fastv_options, keep_mask
from tamp_modifier.token_pruning.token_drop import gather_positions

KEEP_ALL = dict(min_tokens=10**6, stage2_min_tokens=10**6)
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def qwen_row(model, grids, text=(3, 5, 4), seed=0):
    """One prompt: text, then for each (h, w) patch grid an image between vision markers, then text."""
    cfg, v = model.config, model.config.vision_config
    rng = np.random.default_rng(seed)
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pieces, pixels = [rng.integers(3, 200, text[0])], []
    for i, (h, w) in enumerate(grids):
        pixels.append(torch.from_numpy(rng.standard_normal((h * w, width), dtype=np.float32)))
        merged = h * w // v.spatial_merge_size**2
        pieces += [[cfg.vision_start_token_id], [cfg.image_token_id] * merged, [cfg.vision_end_token_id],
                   rng.integers(3, 200, text[1 + min(i, 1)])]
    ids = torch.tensor(np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]))
    return ids, torch.cat(pixels), torch.tensor([[1, h, w] for h, w in grids])


def batch_of(model, layouts=(((8, 8),), ((8, 8), (4, 8)), ((8, 12),)), seed=0):
    """Left-padded prompts of different lengths, one or two images each (grids of different sizes)."""
    rows = [qwen_row(model, grids, text=(3 + i, 4 + i, 5), seed=seed + i) for i, grids in enumerate(layouts)]
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, _, _) in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([r[1] for r in rows]),
            "image_grid_thw": torch.cat([r[2] for r in rows]),
            "mm_token_type_ids": (ids == model.config.image_token_id).long()}


@pytest.fixture(scope="module")
def models():
    return {f: build_tiny_model(f, num_layers=3, vision_layers=2, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_is_bitwise_the_unmodified_model(family, models):
    model = models[family]
    batch = batch_of(model)
    before = logits(model, batch)
    gen_before = model.generate(**batch, max_new_tokens=3, do_sample=False)
    hooks_before = hooks(model)
    pruner = enable_token_pruning(model, **KEEP_ALL)
    try:
        assert torch.equal(logits(model, batch), before)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), gen_before)
        assert all(c.stage1_visual == c.visual and c.stage2_tokens == c.tokens for c in pruner.last)
    finally:
        disable_token_pruning(model)
    enable_token_pruning(model)  # prune for real, then switch off: the loaded model again
    pruned = logits(model, batch, logits_to_keep=1)
    disable_token_pruning(model)
    assert not torch.allclose(pruned, before[:, -1:])
    assert hooks(model) == hooks_before
    assert torch.equal(logits(model, batch), before)


def test_videos_pass_whole_through_stage_1(models):
    model = models["qwen2_vl"]
    row = make_calibration_dataset(model, 1, video=True, seed=3)[0]
    before = logits(model, row)
    enable_token_pruning(model, **KEEP_ALL)
    try:
        assert torch.equal(logits(model, row), before)
    finally:
        disable_token_pruning(model)
    pruner = enable_token_pruning(model, stage2=False)
    try:
        logits(model, row)
    finally:
        disable_token_pruning(model)
    kept = torch.tensor(pruner.last[0].kept_stage1)
    ids = row["input_ids"][0]
    assert (ids == model.config.video_token_id).nonzero()[:, 0].tolist() == [
        int(c) for c in kept if ids[c] == model.config.video_token_id]
    assert pruner.last[0].stage1_visual < pruner.last[0].visual


def reference_inputs(model, batch):
    """Embeddings with the image features in place, M-RoPE ids and DeepStack features, computed by
    the unmodified model's own functions."""
    mm = model.model
    with torch.no_grad():
        embeds = mm.get_input_embeddings()(batch["input_ids"])
        out = mm.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        image = batch["input_ids"] == model.config.image_token_id
        embeds = embeds.masked_scatter(image[..., None], torch.cat(list(out.pooler_output)))
        pos, _ = mm.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                   attention_mask=batch["attention_mask"])
    return embeds, image, pos, getattr(out, "deepstack_features", None)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_stage1_equals_the_unmodified_language_model_on_the_kept_tokens(family, models):
    """The kept tokens, with their original M-RoPE positions (and, on Qwen3-VL, their DeepStack
    features), fed by hand to the unmodified language model: the same logits and greedy tokens."""
    model = models[family]
    batch = batch_of(model, seed=4)
    got, gen, counts = stage1_only(model, batch)
    assert len({c.stage1_tokens for c in counts}) > 1, "the batch should need re-padding"
    embeds, image, pos, deepstack = reference_inputs(model, batch)
    b, width = len(counts), max(c.stage1_tokens for c in counts)
    ref_embeds = torch.zeros(b, width, embeds.shape[-1])
    ref_mask = torch.zeros(b, width, dtype=torch.long)
    ref_pos = torch.zeros(3, b, width, dtype=torch.long)
    ref_image = torch.zeros(b, width, dtype=torch.bool)
    kept_image = []  # per image slot, row-major: kept or not
    for i, c in enumerate(counts):
        cols = torch.tensor(c.kept_stage1)
        assert cols.tolist() == sorted(set(cols.tolist()))
        assert c.stage1_visual == int(image[i, cols].sum()) < c.visual
        ref_embeds[i, width - len(cols):] = embeds[i, cols]
        ref_mask[i, width - len(cols):] = 1
        ref_pos[:, i, width - len(cols):] = pos[:, i, cols]
        ref_image[i, width - len(cols):] = image[i, cols]
        kept_image.append(torch.isin(image[i].nonzero()[:, 0], cols))
    extra = {}
    if deepstack is not None:
        sel = torch.cat(kept_image)
        extra = dict(visual_pos_masks=ref_image, deepstack_visual_embeds=[f[sel] for f in deepstack])
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=ref_embeds, attention_mask=ref_mask,
                                            position_ids=ref_pos, **extra).last_hidden_state
        want = model.lm_head(hidden[:, -1])
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # greedy decoding over the pruned cache continues from the unpruned positions
    with torch.no_grad():
        cache, tokens = None, []
        h_embeds, h_mask, h_pos = ref_embeds, ref_mask, ref_pos
        for _ in range(4):
            out = model.model.language_model(inputs_embeds=h_embeds, attention_mask=h_mask,
                                             position_ids=h_pos, past_key_values=cache, use_cache=True,
                                             **extra)
            extra = {}
            cache = out.past_key_values
            tokens.append(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
            h_embeds = model.get_input_embeddings()(tokens[-1])[:, None]
            h_mask = torch.cat([h_mask, torch.ones(b, 1, dtype=torch.long)], 1)
            h_pos = h_pos[..., -1:] + 1
    assert torch.equal(gen[:, batch["input_ids"].shape[1]:], torch.stack(tokens, 1))
    # a hand-rolled loop without position ids: the pruner supplies the unpruned ones (its rope_deltas)
    enable_token_pruning(model, stage2=False)
    try:
        with torch.no_grad():
            mask, out, mine = batch["attention_mask"], model(**batch, use_cache=True), []
            for _ in range(3):
                mine.append(out.logits[:, -1].argmax(-1))
                mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
                out = model(input_ids=mine[-1][:, None], attention_mask=mask,
                            past_key_values=out.past_key_values, use_cache=True)
    finally:
        disable_token_pruning(model)
    assert torch.equal(torch.stack(mine, 1), torch.stack(tokens[:3], 1))


def recorded_attention(model, batch, monkeypatch):
    """Softmax probabilities of the tower's last block, per image, through the model's own eager
    attention (wrapped to keep what it returns), and the window order of Qwen2.5-VL."""
    tower = model.model.visual
    module = sys.modules[type(tower.blocks[-1].attn).__module__]
    seen = []
    original = module.eager_attention_forward

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out[1])
        return out

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    with torch.no_grad():
        tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    monkeypatch.setattr(module, "eager_attention_forward", original)
    return seen[-len(batch["image_grid_thw"]):]  # the last block: one call per image


@pytest.mark.parametrize("family", FAMILIES)
def test_received_attention_equals_a_brute_force_from_the_towers_attention(family, models, monkeypatch):
    model = models[family]
    batch = batch_of(model, seed=6)
    grid = batch["image_grid_thw"]
    want = []
    for probs in recorded_attention(model, batch, monkeypatch):
        patch = probs[0].mean(0).mean(0)  # heads averaged, then the mean over the image's queries
        want.append(patch.view(-1, 4).mean(1))  # a merged token's 4 patches (in the tower's order)
    want = torch.cat(want)
    if family == "qwen2_5_vl":  # the tower runs in window order; the merger output is put back
        from transformers.vision_utils import get_vision_window_index

        v = model.config.vision_config
        window = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)[0]
        assert not torch.equal(window, torch.arange(len(window))), "windows should reorder the tokens"
        want = want[torch.argsort(window)]
    pruner = enable_token_pruning(model, stage2=False)
    try:
        logits(model, batch, logits_to_keep=1)
        scores = pruner.stage1_scores(**batch)
    finally:
        disable_token_pruning(model)
    assert torch.allclose(torch.cat(scores), want, atol=1e-6, rtol=1e-5)
    per_image = list(want.split((grid.prod(-1) // 4).tolist()))
    image_id, slot = model.config.image_token_id, 0
    for i, c in enumerate(pruner.last):  # each image cut at its own knee
        cols = (batch["input_ids"][i] == image_id).nonzero()[:, 0]
        kept = torch.isin(cols, torch.tensor(c.kept_stage1))
        n_images = int(((batch["input_ids"][i] == model.config.vision_start_token_id)).sum())
        expected = torch.cat([keep_mask(s, "kneedle") for s in per_image[slot:slot + n_images]])
        slot += n_images
        assert torch.equal(kept, expected)


def test_mean_cosine_keeps_the_tokens_closest_to_the_images_mean(models):
    model = models["qwen2_5_vl"]
    batch = batch_of(model, seed=8)
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    pruner = enable_token_pruning(model, similarity="cosine", stage2=False)
    try:
        logits(model, batch, logits_to_keep=1)
    finally:
        disable_token_pruning(model)
    want = []
    for f in feats:
        centre = f.mean(0)
        want.append(keep_mask((f @ centre) / (f.norm(dim=-1) * centre.norm()), "kneedle"))
    want = torch.cat(want)
    image = batch["input_ids"] == model.config.image_token_id
    got = torch.cat([torch.isin(image[i].nonzero()[:, 0], torch.tensor(c.kept_stage1))
                     for i, c in enumerate(pruner.last)])
    assert torch.equal(got, want) and 0 < int(got.sum()) < len(got)


def test_fastv_on_qwen_keeps_the_most_attended_half_of_each_image(models):
    from tamp_modifier.token_pruning import received_attention

    model = models["qwen2_vl"]
    batch = batch_of(model, seed=10)
    with torch.no_grad():
        att = model(**batch, output_attentions=True).attentions[1]
    pruner = enable_token_pruning(model, **fastv_options(0.5, layer=2))
    try:
        logits(model, batch, logits_to_keep=1)
    finally:
        disable_token_pruning(model)
    scores = received_attention(att.mean(1), batch["attention_mask"].bool())
    for i, c in enumerate(pruner.last):
        cols = (batch["input_ids"][i] == model.config.image_token_id).nonzero()[:, 0]
        want = cols[keep_mask(scores[i, cols], keep_ratio=0.5)]
        assert [col for col in c.kept_stage2 if col in set(cols.tolist())] == want.tolist()


def test_deepstack_follows_a_stage2_cut_inside_its_layers():
    """Qwen3-VL with DeepStack features after decoder layers 0 and 1 and the stage-2 cut after layer 0:
    a hand-written decoder loop adds layer 1's features to the surviving visual tokens only."""
    base = build_tiny_model("qwen3_vl", num_layers=3, vision_layers=2, seed=5)
    config = base.config
    config.vision_config.deepstack_visual_indexes = [0, 1]
    torch.manual_seed(5)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.set_attn_implementation("eager")
    batch = batch_of(model, layouts=(((8, 8), (4, 8)),), seed=12)
    pruner = enable_token_pruning(model, stage1=False, layer=1)
    try:
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    finally:
        disable_token_pruning(model)
    c = pruner.records[0]
    kept = torch.tensor(c.kept_stage2)
    embeds, image, pos, deepstack = reference_inputs(model, batch)
    assert len(deepstack) == 2 and 0 < c.stage2_visual < c.visual
    lm = model.model.language_model
    n = embeds.shape[1]
    with torch.no_grad():
        rope = lm.rotary_emb(embeds, pos)
        causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
        h = lm.layers[0](embeds, attention_mask=causal, position_embeddings=rope)
        h = h.clone()
        h[image] += deepstack[0]
        kept_visual = torch.isin(image[0].nonzero()[:, 0], kept)
        h, rope, small = h[:, kept], (rope[0][:, kept], rope[1][:, kept]), image[:, kept]
        m = len(kept)
        causal = causal[..., :m, :m]
        h = lm.layers[1](h, attention_mask=causal, position_embeddings=rope)
        h = h.clone()
        h[small] += deepstack[1][kept_visual]
        h = lm.layers[2](h, attention_mask=causal, position_embeddings=rope)
        want = model.lm_head(lm.norm(h))[:, -1]
    assert torch.allclose(out.logits[0], want, atol=1e-5, rtol=0)


def test_positions_of_kept_tokens_are_the_unpruned_ones():
    pos = torch.arange(2 * 3 * 5).view(3, 2, 5)
    index = torch.tensor([[0, 2, 4], [1, 1, 3]])
    assert gather_positions(pos, index).tolist() == [[[r * 10 + i for i in (0, 2, 4)],
                                                      [r * 10 + 5 + i for i in (1, 1, 3)]] for r in range(3)]


def test_refusals(models):
    smolvlm = build_tiny_model("smolvlm")
    with pytest.raises(ValueError, match="SmolVLMForConditionalGeneration is none of them"):
        enable_token_pruning(smolvlm)
    windowed = build_tiny_model("qwen2_5_vl", num_layers=3, vision_layers=2)
    windowed.config.vision_config.fullatt_block_indexes = [0]
    with pytest.raises(ValueError, match=r"last vision block \(1\) attends within windows only"):
        enable_token_pruning(windowed)
    enable_token_pruning(windowed, similarity="cosine")  # the mean-cosine score needs no attention
    disable_token_pruning(windowed)
    with pytest.raises(ValueError, match="1 <= layer <= 2"):
        enable_token_pruning(models["qwen3_vl"], layer=3)
    sdpa = build_tiny_model("qwen3_vl", num_layers=3, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        enable_token_pruning(sdpa)
    enable_token_pruning(sdpa, stage2=False)  # stage 1 recomputes the tower's attention itself
    disable_token_pruning(sdpa)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_sdpa_keeps_the_same_tokens_as_eager(family):
    """Under sdpa the tower's and the decoder's attention probabilities are recomputed from q/k."""
    kept = []
    for attn in ("eager", "sdpa"):
        model = build_tiny_model(family, num_layers=3, vision_layers=2, seed=7, attn_implementation=attn)
        pruner = enable_token_pruning(model, stage2_keep_ratio=0.5)  # a cut whatever the knee says
        try:
            logits(model, batch_of(model, seed=14), logits_to_keep=1)
        finally:
            disable_token_pruning(model)
        kept.append([(c.kept_stage1, c.kept_stage2) for c in pruner.last])
    assert kept[0] == kept[1]
    assert any(len(k2) < len(k1) for k1, k2 in kept[0])  # stage 2 did cut
