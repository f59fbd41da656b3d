"""Token pruning on tiny real LLaVA / LLaVA-NeXT models: equality with the unmodified model when
nothing is pruned, independent references when tokens are pruned, generation, refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import hooks, logits, stage1_only
from transformers import DynamicCache

from tamp_modifier.testing.synthetic import build_tiny_model, make_calibration_dataset
from tamp_modifier.token_pruning import (
    disable_token_pruning,
    enable_token_pruning,
    fastv_options,
    keep_mask,
    received_attention,
)

KEEP_ALL = dict(min_tokens=10**6, stage2_min_tokens=10**6)


def batch_of(model, n=3, seed=0):
    """``n`` left-padded samples of different lengths (text prefix, image, text), one batch."""
    rows = [make_calibration_dataset(model, 1, text_tokens=6 + 3 * i, seed=seed + i)[0] for i in range(n)]
    width = max(r["input_ids"].shape[1] for r in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(rows):
        length = r["input_ids"].shape[1]
        ids[i, width - length:] = r["input_ids"][0]
        mask[i, width - length:] = 1
    pixels = torch.cat([r["pixel_values"] for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if "image_sizes" in rows[0]:
        batch["image_sizes"] = torch.cat([r["image_sizes"] for r in rows])
    return batch


@pytest.fixture(scope="module")
def llava():
    return build_tiny_model("llava", num_layers=3, vision_layers=2, seed=0)


@pytest.fixture(scope="module")
def llava_next():
    return build_tiny_model("llava_next", num_layers=3, vision_layers=2, seed=1)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_everything_equals_the_unmodified_model_and_disable_restores(family, request):
    model = request.getfixturevalue(family)
    batch = batch_of(model)
    before = logits(model, batch)
    gen_before = model.generate(**batch, max_new_tokens=3, do_sample=False)
    hooks_before = hooks(model)
    pruner = enable_token_pruning(model, **KEEP_ALL)
    try:
        assert torch.allclose(logits(model, batch), before, atol=1e-6, rtol=0)
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), gen_before)
        c = pruner.last[0]
        assert c.stage1_visual == c.visual and c.stage2_tokens == c.tokens
    finally:
        disable_token_pruning(model)
    # now prune hard, then switch off: the model is the loaded one again
    enable_token_pruning(model)
    pruned = logits(model, batch, logits_to_keep=1)
    disable_token_pruning(model)
    assert not torch.allclose(pruned, before[:, -1:])
    assert hooks(model) == hooks_before
    assert torch.equal(logits(model, batch), before)


def reference_inputs(model, batch):
    """Input embeddings with the image features in place, computed by the unmodified model."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes"), return_dict=True,
        ).pooler_output
        feats = torch.cat(list(feats))
        image = batch["input_ids"] == model.config.image_token_id
        return embeds.masked_scatter(image[..., None], feats), image


def test_stage1_equals_the_unmodified_model_on_the_kept_tokens(llava):
    batch = batch_of(llava, n=3)
    got, gen, counts = stage1_only(llava, batch)
    assert len({c.stage1_tokens for c in counts}) > 1, "the batch should need re-padding"
    embeds, image = reference_inputs(llava, batch)
    mask = batch["attention_mask"]
    width = max(c.stage1_tokens for c in counts)
    ref_embeds = torch.zeros(3, width, embeds.shape[-1])
    ref_mask = torch.zeros(3, width, dtype=torch.long)
    ref_pos = torch.zeros(3, width, dtype=torch.long)
    gen_pos = torch.zeros(3, width, dtype=torch.long)
    for i, c in enumerate(counts):
        cols = torch.tensor(c.kept_stage1)
        assert cols.tolist() == sorted(set(cols.tolist()))  # original order, no repeats
        assert c.stage1_visual == int(image[i, cols].sum()) < c.visual
        ref_embeds[i, width - len(cols):] = embeds[i, cols]
        ref_mask[i, width - len(cols):] = 1
        ref_pos[i, width - len(cols):] = cols  # a plain forward's positions are the column indices
        gen_pos[i, width - len(cols):] = (mask[i].cumsum(0) - 1)[cols]  # generate's come from the mask
    with torch.no_grad():
        want = llava(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=ref_pos).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # decoding continues from the original positions, over the pruned cache
    want_gen = llava.generate(inputs_embeds=ref_embeds, attention_mask=ref_mask, position_ids=gen_pos,
                              max_new_tokens=4, do_sample=False)
    assert torch.equal(gen[:, batch["input_ids"].shape[1]:], want_gen)


def test_stage1_scores_come_from_the_layer_the_projector_reads(llava):
    llava.config.vision_feature_layer = -2  # as real LLaVA: the output of the first of 2 vision layers
    try:
        batch = batch_of(llava, n=2)
        pruner = enable_token_pruning(llava, stage2=False)
        logits(llava, batch, logits_to_keep=1)
        disable_token_pruning(llava)
        with torch.no_grad():
            att = llava.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions[0]
        cls_scores = att[:, :, 0, 1:].mean(1)  # CLS query, patches as keys, heads averaged
        for i, c in enumerate(pruner.last):
            image_cols = (batch["input_ids"][i] == llava.config.image_token_id).nonzero()[:, 0]
            kept = torch.isin(image_cols, torch.tensor(c.kept_stage1))
            assert torch.equal(kept, keep_mask(cls_scores[i], "kneedle"))
    finally:
        llava.config.vision_feature_layer = -1


def test_llava_next_scores_follow_each_token_through_the_packing(llava_next):
    """LLaVA-NeXT reorders crops and adds newline tokens: the kept image features must be exactly
    the projected crop tokens with the highest CLS attention, and every newline must stay."""
    batch = batch_of(llava_next, n=1, seed=3)
    pruner = enable_token_pruning(llava_next, stage2=False)
    logits(llava_next, batch, logits_to_keep=1)
    disable_token_pruning(llava_next)
    with torch.no_grad():
        vision = llava_next.model.vision_tower(batch["pixel_values"][0], output_attentions=True,
                                               output_hidden_states=True)
        cls_scores = vision.attentions[-1][:, :, 0, 1:].mean(1).reshape(-1)  # feature layer -1
        projected = llava_next.model.multi_modal_projector(vision.hidden_states[-1][:, 1:])
    want = projected.reshape(-1, projected.shape[-1])[keep_mask(cls_scores, "kneedle")]
    embeds, image = reference_inputs(llava_next, batch)
    kept = embeds[0, [col for col in pruner.last[0].kept_stage1 if image[0, col]]]
    newline = (kept == llava_next.model.image_newline).all(-1)
    all_newlines = (embeds[0][image[0]] == llava_next.model.image_newline).all(-1)
    assert int(newline.sum()) == int(all_newlines.sum()) > 0
    got = kept[~newline]
    assert got.shape == want.shape
    distance = torch.cdist(got, want)
    assert (distance.min(1).values < 1e-5).all() and (distance.min(0).values < 1e-5).all()


def test_stage2_matches_a_hand_written_forward_and_decode():
    """B = 1: run the decoder layers by hand, all tokens up to layer K, the recorded survivors after,
    with a cache per layer; compare the prefill and two decoding steps with generate's logits."""
    model = build_tiny_model("llava", num_layers=4, vision_layers=1, seed=3)
    batch = batch_of(model, n=1, seed=5)
    k = 2
    pruner = enable_token_pruning(model, stage1=False, layer=k)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    disable_token_pruning(model)
    c = pruner.records[0]
    assert c.stage2_tokens < c.tokens
    lm = model.model.language_model
    embeds, _ = reference_inputs(model, batch)
    n = embeds.shape[1]
    kept = torch.tensor(c.kept_stage2)
    system = int((batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert set(range(system)) <= set(kept.tolist()) and n - 1 in kept.tolist()

    def causal(m):
        return torch.full((m, m), torch.finfo(torch.float32).min).triu(1)[None, None]

    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        h, pos = embeds, torch.arange(n)[None]
        rope = lm.rotary_emb(h, pos)
        for i, layer in enumerate(lm.layers):
            if i == k:
                h, pos = h[:, kept], pos[:, kept]
                rope = (rope[0][:, kept], rope[1][:, kept])
            h = layer(h, attention_mask=causal(h.shape[1]), position_embeddings=rope, position_ids=pos,
                      past_key_values=cache, use_cache=True)
        steps = [model.lm_head(lm.norm(h))[:, -1]]
        for t in range(2):
            token = steps[-1].argmax(-1)[:, None]
            h = lm.embed_tokens(token)
            pos = torch.tensor([[n + t]])
            rope = lm.rotary_emb(h, pos)
            for layer in lm.layers:
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=pos,
                          past_key_values=cache, use_cache=True)
            steps.append(model.lm_head(lm.norm(h))[:, -1])
    assert cache.layers[0].keys.shape[-2] == n + 2 and cache.layers[k].keys.shape[-2] == len(kept) + 2
    for got, want in zip(out.logits, steps):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_stage2_never_drops_the_system_prompt_or_the_last_token(llava_next):
    batch = batch_of(llava_next, n=3, seed=7)
    # a tiny fixed share: most candidates go, the protected tokens must stay whatever their scores
    pruner = enable_token_pruning(llava_next, layer=1, stage2_keep_ratio=0.1, stage2_min_tokens=0)
    try:
        llava_next.generate(**batch, max_new_tokens=2, do_sample=False)
    finally:
        disable_token_pruning(llava_next)
    image_id = llava_next.config.image_token_id
    for i, c in enumerate(pruner.records):
        ids = batch["input_ids"][i]
        real = batch["attention_mask"][i].nonzero()[:, 0]
        first_image = int((ids == image_id).nonzero()[0])
        assert set(range(int(real[0]), first_image)) <= set(c.kept_stage2)
        assert int(real[-1]) in c.kept_stage2
        assert list(c.kept_stage2) == sorted(c.kept_stage2) and set(c.kept_stage2) <= set(c.kept_stage1)
        assert c.stage2_tokens < c.stage1_tokens <= c.tokens
        assert c.stage1_visual < c.visual  # newline tokens stay, so at least one per row


def test_generation_runs_end_to_end(llava, llava_next):
    for model in (llava, llava_next):
        batch = batch_of(model, n=2, seed=11)
        pruner = enable_token_pruning(model, layer=1)
        try:
            out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        finally:
            disable_token_pruning(model)
        assert out.shape == (2, batch["input_ids"].shape[1] + 5)
        assert len(pruner.records) == 2  # one prefill of two samples; decoding steps add none


def test_fastv_baseline_keeps_the_most_attended_half_of_the_image(llava):
    batch = batch_of(llava, n=2, seed=13)
    with torch.no_grad():
        att = llava(**batch, output_attentions=True).attentions[1]  # layer K-1 = 1, K = 2
    pruner = enable_token_pruning(llava, **fastv_options(0.5, layer=2))
    try:
        logits(llava, batch, logits_to_keep=1)
    finally:
        disable_token_pruning(llava)
    mask = batch["attention_mask"].bool()
    scores = received_attention(att.mean(1), mask)
    for i, c in enumerate(pruner.last):
        image_cols = (batch["input_ids"][i] == llava.config.image_token_id).nonzero()[:, 0]
        want = image_cols[keep_mask(scores[i, image_cols], keep_ratio=0.5)]
        kept_images = [col for col in c.kept_stage2 if col in set(image_cols.tolist())]
        assert kept_images == want.tolist()
        assert c.stage2_visual == c.visual // 2 and c.stage1_tokens == c.tokens
        assert c.stage2_tokens == c.tokens - c.visual // 2  # text untouched


def test_sdpa_scores_equal_eager_scores():
    eager = build_tiny_model("llava", num_layers=3, vision_layers=1, seed=4)
    sdpa = build_tiny_model("llava", num_layers=3, vision_layers=1, seed=4, attn_implementation="sdpa")
    batch = batch_of(eager, n=2, seed=17)
    kept = []
    for model in (eager, sdpa):
        pruner = enable_token_pruning(model)
        logits(model, batch, logits_to_keep=1)
        disable_token_pruning(model)
        kept.append([(c.kept_stage1, c.kept_stage2) for c in pruner.last])
    assert kept[0] == kept[1]


@pytest.mark.parametrize("num_layers, layer", [(3, 1), (4, 2)])
def test_sdpa_prunes_one_unpadded_prompt_as_eager_does(num_layers, layer):
    # One prompt without padding: transformers gives the sdpa kernel no mask (its own causal one).
    # The layers after the cut must still get a mask of their own length, made once per forward:
    # made again at the second pruned layer it counted the first one's new cache entries twice.
    outputs = []
    for attn in ("eager", "sdpa"):
        model = build_tiny_model("llava", num_layers=num_layers, vision_layers=2, seed=1,
                                 attn_implementation=attn)
        batch = batch_of(model, n=1, seed=3)
        pruner = enable_token_pruning(model, layer=layer, stage2_keep_ratio=0.5, stage2_min_tokens=0)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True,
                                       return_dict_in_generate=True)
        disable_token_pruning(model)
        assert pruner.last[0].stage2_tokens < pruner.last[0].stage1_tokens  # stage 2 did cut
        outputs.append(generated)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for eager, sdpa in zip(outputs[0].scores, outputs[1].scores):
        torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-4)


def test_refusals():
    smolvlm = build_tiny_model("smolvlm")  # a SigLIP tower and a pixel-shuffle connector: not mapped
    with pytest.raises(ValueError, match="SmolVLMForConditionalGeneration is none of them"):
        enable_token_pruning(smolvlm)
    model = build_tiny_model("llava", num_layers=3)
    with pytest.raises(ValueError, match="similarity='received_attention' is the score of towers without"):
        enable_token_pruning(model, similarity="received_attention")
    model = build_tiny_model("llava", num_layers=2)
    with pytest.raises(ValueError, match="1 <= layer <= 1"):
        enable_token_pruning(model, layer=2)
    with pytest.raises(ValueError, match=r"knee must be one of \(.*\), got 'elbow'"):
        enable_token_pruning(model, knee="elbow")
    enable_token_pruning(model, layer=1)
    with pytest.raises(ValueError, match="already enabled"):
        enable_token_pruning(model, layer=1)
    batch = batch_of(model, n=1)
    with pytest.raises(ValueError, match="for inference"):
        model(**batch, labels=batch["input_ids"])
    disable_token_pruning(model)
    assert disable_token_pruning(model) is None
