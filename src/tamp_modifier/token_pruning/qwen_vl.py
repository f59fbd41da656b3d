"""Visual-token pruning at inference on Qwen2-VL, Qwen2.5-VL and Qwen3-VL, through removable hooks.

The same two stages as on LLaVA (``pruner.TokenPruner``, whose hooks this class
inherits: stage 2, decoding, the counts), with what differs in these models, in
``QwenVLStage1`` (scores, positions, DeepStack features of the kept tokens) and
``QwenVLTokenPruner`` (checks, decoding positions, DeepStack hooks):

- No CLS token: stage 1 scores each patch by the mean attention it receives from
  every query of its own image in the tower's last block (``"attention"``, read as
  ``"received_attention"``), or by the cosine of each visual token to the image's
  mean token (``"cosine"``, read as ``"mean_cosine"``). Received attention is the
  CLS attention with the CLS query replaced by all queries: how much of the
  tower's own last mixing step draws on a patch.
- The merger joins 2x2 patches into one language-model token, so a token's score
  is the mean of its 4 patches' scores. Qwen2.5-VL runs its tower in window order;
  the scores are put back in the merger's output order with the model's own window
  index. Qwen2.5-VL's last block must be a full-attention one (every released
  checkpoint's is) for received attention to span the whole image.
- M-RoPE: every kept token keeps the 3-D position the unpruned prompt gives it
  (the model's own ``compute_3d_position_ids``, or the ids ``generate`` passes), so
  a kept patch keeps its row and column and the text after the image keeps its
  offsets; decoding continues from the unpruned positions (``rope_deltas``).
- Qwen3-VL's DeepStack features (added to the visual slots after the first
  decoder layers) follow the kept tokens: stage 1 hands the text model only the
  kept tokens' features, and after a stage-2 cut inside those layers the
  remaining additions go to the stage-2 survivors only.

Only image tokens are candidates in stage 1; video tokens pass whole (Qwen3-VL:
stage 1 refuses a batch with a video, its DeepStack features would need merging).
"""

from __future__ import annotations

import sys

import torch

from tamp_modifier.token_pruning.forward_state import Phase, Prefill
from tamp_modifier.token_pruning.options import QWEN_SUPPORTED, TokenPruningOptions
from tamp_modifier.token_pruning.pruner import TokenPruner
from tamp_modifier.token_pruning.scores import group_mean, mean_cosine, patch_attention_received
from tamp_modifier.token_pruning.stage1 import ImageFeatures, Stage1
from tamp_modifier.token_pruning.stage2 import check_stage2
from tamp_modifier.token_pruning.token_drop import gather_tokens

__all__ = ["QwenVLStage1", "QwenVLTokenPruner", "mrope_decode_positions", "qwen_similarity"]

_CLS_FREE = {"attention": "received_attention", "cosine": "mean_cosine"}


def qwen_similarity(similarity: str) -> str:
    """The CLS-free score a ``similarity`` option means on a tower without CLS."""
    return _CLS_FREE.get(similarity, similarity)


def mrope_decode_positions(rope_deltas, text: torch.Tensor, b: int, device) -> torch.Tensor:
    """M-RoPE ids of new tokens from their text positions ``[B, q]`` in the unpruned sequence: what the
    unpruned model computes, the text positions plus its ``rope_deltas``, on all 3 axes."""
    if rope_deltas is None:
        return text
    text = text + rope_deltas.to(device).repeat_interleave(b // rope_deltas.shape[0], dim=0)
    return text[None].expand(3, b, text.shape[1])


class QwenVLStage1(Stage1):
    """Stage 1 on Qwen-VL: CLS-free scores per merged token, M-RoPE positions, DeepStack features."""

    always_pass_positions = True  # M-RoPE ids are not the 0..n-1 the text model would make

    def _setup(self) -> None:
        visual = self._mm.visual
        self._similarity = qwen_similarity(self.options.similarity)
        self._merge_unit = visual.spatial_merge_size**2
        self._last_attn = visual.blocks[-1].attn
        self._windowed = hasattr(visual, "fullatt_block_indexes")  # Qwen2.5-VL: tower in window order
        self.deepstack_layers = len(getattr(visual, "deepstack_visual_indexes", None) or [])

    def image_features(self, module, kw: dict) -> ImageFeatures:
        """Per image: merged features, stage-1 scores per merged token, always-kept flags (none), and
        Qwen3-VL's DeepStack features."""
        if kw.get("pixel_values_videos") is not None and self.deepstack_layers:
            raise ValueError(
                "stage 1 on Qwen3-VL takes images only (a video's DeepStack features would need "
                "merging with the images'); pass stage1=False for batches with videos"
            )
        grid = kw["image_grid_thw"]
        captured = {}

        def capture(_module, args, kwargs):
            captured.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])

        handle = None
        if self._similarity == "received_attention":
            handle = self._last_attn.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            out = module.get_image_features(pixel_values=kw["pixel_values"], image_grid_thw=grid,
                                            return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        features = list(out.pooler_output)
        with torch.no_grad():
            if self._similarity == "received_attention":
                merged = group_mean(self._received(captured), self._merge_unit)
                if self._windowed:
                    merged = merged[torch.argsort(self._window_index(grid))]
                scores = list(merged.split([f.shape[0] for f in features]))
            else:
                scores = [mean_cosine(f) for f in features]
        forced = [torch.zeros(s.shape[0], dtype=torch.bool, device=s.device) for s in scores]
        return ImageFeatures(features, scores, forced, deepstack=getattr(out, "deepstack_features", None))

    def _received(self, captured) -> torch.Tensor:
        """Received attention of every patch in the last block, from its own q/k projections."""
        attn = self._last_attn
        hidden = captured["hidden"]
        qkv = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1)
        q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["position_embeddings"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        return patch_attention_received(q, k, captured["cu_seqlens"].tolist(), attn.scaling)

    def _window_index(self, grid) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self._mm.visual
        merge, window, patch = visual.spatial_merge_size, visual.window_size, visual.patch_size
        return get_vision_window_index(grid, merge, window, patch)[0]

    def prefill_positions(self, module, kw: dict, embeds: torch.Tensor) -> torch.Tensor:
        position_ids = kw.get("position_ids")
        if position_ids is None:  # the model's own M-RoPE ids (this also sets its rope_deltas for decoding)
            position_ids = module.compute_3d_position_ids(
                input_ids=kw.get("input_ids"), inputs_embeds=embeds, image_grid_thw=kw.get("image_grid_thw"),
                video_grid_thw=kw.get("video_grid_thw"), attention_mask=kw.get("attention_mask"),
                past_key_values=kw.get("past_key_values"), mm_token_type_ids=kw.get("mm_token_type_ids"),
            )
        if position_ids is None:  # no grid: the text model's own default
            position_ids = super().prefill_positions(module, dict(kw, position_ids=None), embeds)
        return position_ids

    def _after_cut(self, prefill: Prefill, found: ImageFeatures, keep_image: torch.Tensor) -> None:
        # the DeepStack features of the kept tokens only, added to the kept image slots
        if found.deepstack:
            keep = keep_image.to(found.deepstack[0].device)
            prefill.deepstack = [f[keep] for f in found.deepstack]
            prefill.visual_mask = prefill.image


class QwenVLTokenPruner(TokenPruner):
    """``TokenPruner`` for the Qwen-VL families (see the module docstring)."""

    stage1_class = QwenVLStage1

    @classmethod
    def check_model(cls, model, options: TokenPruningOptions) -> None:
        name = type(model).__name__
        if name not in QWEN_SUPPORTED:
            raise ValueError(f"{name} is not a Qwen-VL model this pruner knows ({', '.join(QWEN_SUPPORTED)})")
        vcfg = model.config.vision_config
        full = getattr(vcfg, "fullatt_block_indexes", None)
        received = qwen_similarity(options.similarity) == "received_attention"
        if options.stage1 and received and full is not None:
            if vcfg.depth - 1 not in full:
                raise ValueError(
                    f"the last vision block ({vcfg.depth - 1}) attends within windows only "
                    f"(fullatt_block_indexes={list(full)}), so received attention would not span the image; "
                    "use similarity='cosine'"
                )
        check_stage2(model, options)

    def attach(self) -> None:
        if self.stage1.deepstack_layers:
            self._attach_deepstack()
        super().attach()

    def _decode_positions(self, mask, past: int, b: int, q: int, device) -> torch.Tensor:
        # what the unpruned model computes: text positions of the unpruned sequence plus its rope_deltas
        if mask is not None:
            text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -q:]
        else:
            text = super()._decode_positions(None, past, b, q, device)
        return mrope_decode_positions(self._mm.rope_deltas, text, b, device)

    # ------------------------------------------------------------------ Qwen3-VL DeepStack

    def _attach_deepstack(self) -> None:
        """The text model adds DeepStack features after its first layers; layers from the stage-2 scorer on
        get them from these hooks instead, so that a cut can drop them with their tokens. Registered
        before the cut hook: on the scoring layer the features are added first, as the model does."""
        self._handles.append(self._lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        first = self.options.layer - 1 if self.options.stage2 else self.stage1.deepstack_layers
        for i in range(first, self.stage1.deepstack_layers):
            self._handles.append(self._layers[i].register_forward_hook(self._deepstack_hook(i)))

    def _lm_pre(self, module, args, kwargs):
        if self.state.phase is not Phase.PREFILL:
            return None
        prefill = self.state.prefill
        if prefill.deepstack is None:  # stage 1 did not run: what the model computed itself
            features = kwargs.get("deepstack_visual_embeds")
            if features is None:
                return None
            prefill.deepstack, prefill.visual_mask = list(features), kwargs["visual_pos_masks"]
        first = self.options.layer - 1 if self.options.stage2 else len(prefill.deepstack)
        return args, dict(kwargs, visual_pos_masks=prefill.visual_mask,
                          deepstack_visual_embeds=prefill.deepstack[:first] or None)

    def _deepstack_hook(self, i: int):
        def hook(_module, _args, output):
            if self.state.phase is not Phase.PREFILL:
                return None
            prefill = self.state.prefill
            if prefill.deepstack is None or i >= len(prefill.deepstack):
                return None
            features, mask = prefill.deepstack[i], prefill.visual_mask
            if i >= self.options.layer and prefill.index2 is not None:  # after the cut: the survivors only
                hits = torch.zeros_like(mask, dtype=torch.long).scatter_add_(1, prefill.index2,
                                                                            prefill.valid2.long())
                kept = hits > 0  # the L1 slots that survived (padding slots repeat one, adding 0)
                features = features[kept[mask]]
                mask = gather_tokens(mask, prefill.index2) & prefill.valid2
            return self._lm._deepstack_process(output, mask, features)

        return hook
