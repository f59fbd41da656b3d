"""Stage 1, before the language model: score each image's visual tokens in the vision tower, cut at the knee.

``Stage1.prune_inputs`` runs in the multimodal model's pre-hook. It computes the
image features itself with the model's own ``get_image_features`` (capturing the
scores on the way), puts them in the image slots as the model would, keeps each
image's head before the knee (``keep_per_image``) and hands the language model
only the survivors (``inputs_embeds``), with their original position ids and a
left-padded attention mask. It returns the ``Prefill`` that the later hooks of
this forward share.

The scores here are LLaVA's: similarity to the vision encoder's CLS token in the
layer whose output the projector reads (``"attention"``: the CLS query's
attention, heads averaged; ``"cosine"``: cosine of hidden states). LLaVA-NeXT's
crops are packed by the model (reordered, unpadded, a newline token per row):
``llava_next_scores`` maps the scores through that same packing. Qwen-VL's
tower has no CLS token: ``qwen_vl.QwenVLStage1`` overrides the scores and the
positions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from tamp_modifier.token_pruning.forward_state import Prefill
from tamp_modifier.token_pruning.knee import keep_mask
from tamp_modifier.token_pruning.options import TokenPruningOptions
from tamp_modifier.token_pruning.scores import cls_attention, cls_cosine
from tamp_modifier.token_pruning.token_drop import gather_positions, gather_tokens, repack

__all__ = ["ImageFeatures", "Stage1", "keep_per_image", "llava_next_scores", "vision_layer_index",
           "vision_layers"]


@dataclass
class ImageFeatures:
    """What the tower gives stage 1, one entry per image, in placeholder order."""

    features: list[torch.Tensor]  # projected features: what the language model gets in the image slots
    scores: list[torch.Tensor]  # the stage-1 score of each feature
    forced: list[torch.Tensor]  # features always kept (CLS under "full", LLaVA-NeXT's newlines)
    deepstack: list | None = None  # Qwen3-VL: per DeepStack layer, the features of every visual token


def keep_per_image(scores: list, forced: list, options: TokenPruningOptions) -> torch.Tensor:
    """Per image, the knee cut of its scores (the ``forced`` ones always kept), concatenated in
    placeholder order: row-major, the order in which masked_scatter filled the image slots."""
    keep_img = []
    for s, f in zip(scores, forced):
        keep = f.clone()
        cand = ~f
        if cand.any():
            keep[cand] = keep_mask(s[cand], options.knee, options.min_tokens, options.max_tokens)
        keep_img.append(keep)
    return torch.cat(keep_img)


class Stage1:
    """Stage 1 of one model: LLaVA / LLaVA-NeXT here, Qwen-VL in ``qwen_vl.QwenVLStage1``."""

    # whether stage 1 hands the language model explicit position ids even when it keeps every token
    # (LLaVA's are the plain 0..n-1 the language model makes itself; Qwen's M-RoPE ones are not)
    always_pass_positions = False

    def __init__(self, model, options: TokenPruningOptions):
        self.model, self.options = model, options
        self._mm = model.model
        self._setup()

    def _setup(self) -> None:
        """What this family's scores need, found once."""
        self._is_next = type(self.model).__name__ == "LlavaNextForConditionalGeneration"
        self._vision_layers = vision_layers(self._mm.vision_tower)

    def prune_inputs(self, module, kw: dict, valid: torch.Tensor) -> tuple[Prefill, dict]:
        """The prefill's state and the multimodal model's keywords with only the kept tokens.

        ``kw``: the bound keywords of the call (``pixel_values`` present); ``valid``: ``[B, L]``
        real slots of the prompt.
        """
        input_ids, embeds, mask = kw.get("input_ids"), kw.get("inputs_embeds"), kw.get("attention_mask")
        device = (embeds if embeds is not None else input_ids).device
        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)
        found = self.image_features(module, kw)
        flat = torch.cat(found.features, 0).to(embeds.device, embeds.dtype)
        image = module.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=flat)
        image = (image[0] if isinstance(image, tuple) else image)[..., 0]  # Qwen's: (image, video) masks
        embeds = embeds.masked_scatter(image[..., None], flat)

        keep_image = keep_per_image(found.scores, found.forced, self.options)
        keep = valid.clone()
        keep[image] = keep_image.to(device)
        keep &= valid

        position_ids = self.prefill_positions(module, kw, embeds)
        prefill = Prefill.of_prompt(valid, image, mask)
        prefill.image_features = found.features
        out = dict(kw, input_ids=None, pixel_values=None, inputs_embeds=embeds)
        if self.always_pass_positions:
            out["position_ids"] = position_ids
        if not torch.equal(keep, valid):
            index, new_valid = repack(keep)
            prefill.valid, prefill.image = new_valid, gather_tokens(image, index) & new_valid
            prefill.columns = index
            prefill.mask1 = new_valid.long()
            out.update(inputs_embeds=gather_tokens(embeds, index), attention_mask=prefill.mask1,
                       position_ids=gather_positions(position_ids, index))
        self._after_cut(prefill, found, keep_image)
        return prefill, out

    def prefill_positions(self, module, kw: dict, embeds: torch.Tensor) -> torch.Tensor:
        """The position ids the unpruned prompt gets, to be gathered for the kept tokens."""
        position_ids = kw.get("position_ids")
        if position_ids is None:  # what the language model would use: 0..n-1, padding included
            b, n = embeds.shape[:2]
            position_ids = torch.arange(n, device=embeds.device)[None].expand(b, n)
        return position_ids

    def _after_cut(self, prefill: Prefill, found: ImageFeatures, keep_image: torch.Tensor) -> None:
        """Called once the tokens are chosen (``keep_image``: per image slot, row-major): what else
        must follow the kept tokens (Qwen3-VL's DeepStack features). Nothing on LLaVA."""

    def image_features(self, module, kw: dict) -> ImageFeatures:
        """Per image: projected features, stage-1 scores and always-kept flags, in placeholder order."""
        cfg = self.model.config
        feature_layer = kw.get("vision_feature_layer")
        feature_layer = cfg.vision_feature_layer if feature_layer is None else feature_layer
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        depth = len(self._vision_layers)
        deepest = max(layers, key=lambda x: vision_layer_index(x, depth))
        attn = self._vision_layers[vision_layer_index(deepest, depth)].self_attn
        captured = {}
        handles = []
        if self.options.similarity == "attention":
            for name in ("q_proj", "k_proj"):
                handles.append(getattr(attn, name).register_forward_hook(
                    lambda _m, _a, o, name=name: captured.__setitem__(name, o)))
        call = {k: kw[k] for k in ("image_sizes",) if kw.get(k) is not None}
        try:
            out = module.get_image_features(
                pixel_values=kw["pixel_values"], vision_feature_layer=feature_layer,
                vision_feature_select_strategy=strategy, return_dict=True, **call,
            )
        finally:
            for h in handles:
                h.remove()
        features = list(out.pooler_output)
        with torch.no_grad():
            if self.options.similarity == "attention":
                q, k = captured["q_proj"], captured["k_proj"]
                crop_scores = cls_attention(q, k, attn.num_heads, attn.scale)
            else:
                crop_scores = cls_cosine(out.hidden_states[deepest])
            if strategy == "full":  # the projector also gets CLS: keep it, score it above all
                top = torch.full_like(crop_scores[:, :1], float("inf"))
                crop_scores = torch.cat([top, crop_scores], 1)
        if self._is_next:
            scores, forced = llava_next_scores(self.model, module, crop_scores, kw["image_sizes"], strategy,
                                               features)
            return ImageFeatures(features, scores, forced)
        scores = [crop_scores[i] for i in range(len(features))]
        for f, s in zip(features, scores):
            if f.shape[0] != s.shape[0]:
                raise ValueError(f"{f.shape[0]} image features but {s.shape[0]} scored vision tokens")
        return ImageFeatures(features, scores, [torch.isinf(s) for s in scores])


def llava_next_scores(model, module, crop_scores, image_sizes, strategy, features) -> tuple[list, list]:
    """LLaVA-NeXT packs crops (reordered, unpadded, a newline token per row): map the per-crop scores
    through the model's own ``pack_image_features`` by packing token indices instead of features.
    Returns per image the scores and the always-kept flags (newline tokens, and CLS under "full")."""
    cfg = model.config
    size_to_patches = sys.modules[type(module).__module__].image_size_to_num_patches
    per_image = [size_to_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                 patch_size=cfg.vision_config.image_size) for s in image_sizes]
    crops, tokens = crop_scores.shape
    ids = torch.arange(crops * tokens, dtype=torch.float64, device=crop_scores.device)
    ids = ids.view(crops, tokens, 1)
    newline = torch.tensor([-1.0], dtype=torch.float64, device=crop_scores.device)
    packed, _ = module.pack_image_features(
        list(torch.split(ids, per_image, 0)), image_sizes, strategy, image_newline=newline,
    )
    flat = crop_scores.reshape(-1)
    scores, forced = [], []
    for p, f in zip(packed, features):
        idx = p[:, 0].round().long()
        if idx.shape[0] != f.shape[0]:
            raise ValueError(f"{f.shape[0]} packed features but {idx.shape[0]} mapped tokens")
        is_newline = idx < 0  # newline tokens carry layout, not content: always kept
        s = flat[idx.clamp_min(0)].masked_fill(is_newline, 0.0)
        scores.append(s)
        forced.append(is_newline | torch.isinf(s))
    return scores, forced


def vision_layers(tower) -> list:
    """The encoder layers of a LLaVA vision tower (CLIP's, or a wrapper around it)."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")


def vision_layer_index(feature_layer: int, depth: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (-1: the embeddings)."""
    return feature_layer % (depth + 1) - 1 if feature_layer < 0 else feature_layer - 1
