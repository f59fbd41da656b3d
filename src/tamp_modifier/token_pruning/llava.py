"""Visual-token pruning at inference on a loaded LLaVA / LLaVA-NeXT model, through removable hooks.

Nothing of the model is replaced: ``TokenPruner.attach`` registers forward
hooks and pre-hooks, ``detach`` removes them, and the model is then exactly the
one that was loaded.

Stage 1 (a pre-hook on the multimodal model, ``model.model``): computes the image
features itself with the model's own ``get_image_features``, scores each visual
token by its similarity to the CLS token in the vision layer whose output the
projector reads, cuts each image's tokens at the knee, and hands the language
model only the survivors (``inputs_embeds``), with their original position ids and
a left-padded attention mask.

Stage 2 (hooks on decoder layers): the attention of layer ``layer - 1`` (the last
layer that sees every token) scores each token after the system prompt by the
attention it receives from the question tokens; the cut at the knee is applied to
that layer's output, so layers ``layer`` and later, and their KV cache, hold only
the survivors. The system prompt (every token before the first image token) and
the last token are never dropped.

Decoding after the prefill: the multimodal pre-hook translates the attention
mask and position ids that ``generate`` passes for the unpruned prompt to the
pruned cache, and the pruned layers get a mask sized to their own, shorter cache.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from dataclasses import dataclass, field

import torch
from loguru import logger

from tamp_modifier.token_pruning.accounting import SampleCounts
from tamp_modifier.token_pruning.knee import KNEE_RULES, keep_mask
from tamp_modifier.token_pruning.layout import gather_tokens, repack
from tamp_modifier.token_pruning.scores import cls_attention, cls_cosine, received_attention

__all__ = ["TokenPruner", "TokenPruningOptions"]

_ATTR = "_tamp_token_pruner"
_SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
QWEN_SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                  "Qwen3VLForConditionalGeneration")
# "attention"/"cosine" are read by the tower: against CLS where it has one (LLaVA), else as their CLS-free
# forms "received_attention"/"mean_cosine" (Qwen-VL, see qwen_vl.py), which can also be named outright.
SIMILARITIES = ("attention", "cosine", "received_attention", "mean_cosine")
STAGE2_QUERIES = ("question", "all")
STAGE2_CANDIDATES = ("after_system", "visual")


@dataclass(frozen=True)
class TokenPruningOptions:
    """Every option of the spec, with its default (see ``enable_token_pruning``)."""

    stage1: bool = True
    similarity: str = "attention"
    knee: str = "kneedle"
    min_tokens: int = 1
    max_tokens: int | None = None
    stage2: bool = True
    layer: int = 2
    stage2_knee: str | None = None
    stage2_min_tokens: int = 1
    stage2_max_tokens: int | None = None
    stage2_queries: str = "question"
    stage2_candidates: str = "after_system"
    stage2_keep_ratio: float | None = None
    verbose: bool = False

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")

        check("similarity", self.similarity, SIMILARITIES)
        check("knee", self.knee, KNEE_RULES)
        if self.stage2_knee is not None:
            check("stage2_knee", self.stage2_knee, KNEE_RULES)
        check("stage2_queries", self.stage2_queries, STAGE2_QUERIES)
        check("stage2_candidates", self.stage2_candidates, STAGE2_CANDIDATES)
        for name in ("min_tokens", "stage2_min_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for lo, hi in (("min_tokens", "max_tokens"), ("stage2_min_tokens", "stage2_max_tokens")):
            if getattr(self, hi) is not None and getattr(self, hi) < getattr(self, lo):
                raise ValueError(f"{hi}={getattr(self, hi)} is below {lo}={getattr(self, lo)}")
        if self.stage2_keep_ratio is not None and not 0.0 <= self.stage2_keep_ratio <= 1.0:
            raise ValueError(f"stage2_keep_ratio must be in [0, 1], got {self.stage2_keep_ratio}")
        if not (self.stage1 or self.stage2):
            raise ValueError("both stages are off: set stage1=True or stage2=True (or do not enable pruning)")


@dataclass
class _Prefill:
    """What one prefill call knows, from the multimodal pre-hook to the post-hook."""

    tokens: torch.Tensor  # [B] real tokens before stage 1
    visual: torch.Tensor  # [B] image tokens before stage 1
    valid: torch.Tensor  # [B, L1] real (non-padding) slots at the language model's input
    image: torch.Tensor  # [B, L1] image-token slots
    orig_len: int  # prompt length as given (padding included)
    mask1: torch.Tensor  # [B, L1] the 2-D attention mask handed to the language model
    columns: torch.Tensor | None = None  # [B, L1] input column of each slot (None: the identity)
    index2: torch.Tensor | None = None  # [B, L2] stage-2 survivors, positions in the L1 layout
    valid2: torch.Tensor | None = None  # [B, L2]
    pruned_mask: object = None  # the 4-D mask of the pruned layers (built once)
    deepstack: list | None = None  # Qwen3-VL: per DeepStack layer, the features of the visual slots
    visual_mask: torch.Tensor | None = None  # [B, L1] the slots those features are added to


@dataclass
class _Generation:
    """What decoding steps after a pruned prefill need."""

    cache: object  # weakref to the cache the prefill filled
    orig_len: int
    mask1: torch.Tensor
    valid2: torch.Tensor | None
    seen: int = 0  # tokens fed after the prefill


@dataclass
class _Decode:
    mask1: torch.Tensor | None  # [B, L1 + seen + q]
    pruned_mask: object = None
    pruned_mask2d: torch.Tensor | None = None


@dataclass
class TokenPruner:
    """The hooks of one enabled model, and the kept-token counts they recorded.

    ``records`` holds one ``SampleCounts`` per sample of every prefill since
    ``enable_token_pruning`` (or ``clear()``); ``last`` those of the latest prefill.

        pruner = enable_token_pruning(model)
        model(**batch)
        [c.stage1_visual for c in pruner.last]
    """

    model: torch.nn.Module = field(repr=False)
    options: TokenPruningOptions
    records: list[SampleCounts] = field(default_factory=list, repr=False)
    last: list[SampleCounts] = field(default_factory=list, repr=False)

    # whether stage 1 hands the language model explicit position ids even when it keeps every token
    # (LLaVA's are the plain 0..n-1 the language model makes itself; Qwen's M-RoPE ones are not)
    _always_pass_positions = False

    def __post_init__(self):
        self._handles = []
        self._ctx = None
        self._gen = None
        mm = self.model.model
        self._mm = mm
        self._lm = mm.language_model
        self._layers = list(self._lm.layers)
        self._signature = inspect.signature(mm.forward)
        self._setup()

    def _setup(self) -> None:
        """What the model-specific hooks need, found once."""
        self._is_next = type(self.model).__name__ == "LlavaNextForConditionalGeneration"
        self._vision_layers = _vision_layers(self._mm.vision_tower)

    # ------------------------------------------------------------------ set-up

    @classmethod
    def check_model(cls, model, options: TokenPruningOptions) -> None:
        """Raise a ValueError naming the problem if ``model`` cannot take these options."""
        name = type(model).__name__
        if name not in _SUPPORTED:
            raise ValueError(
                f"token pruning supports {', '.join(_SUPPORTED + QWEN_SUPPORTED)}; {name} is none of them "
                "(its tower, merger and position ids have not been mapped). Use a model of those families"
            )
        if options.similarity not in ("attention", "cosine"):
            raise ValueError(
                f"similarity={options.similarity!r} is the score of towers without a CLS token (Qwen-VL); "
                f"{name} has one: use similarity='attention' or 'cosine'"
            )
        tower = model.model.vision_tower
        if options.stage1 and getattr(getattr(tower, "embeddings", None), "class_embedding", None) is None:
            raise ValueError(
                f"the vision tower {type(tower).__name__} has no CLS token (no embeddings.class_embedding), "
                "and stage 1 scores visual tokens by their similarity to CLS; pass stage1=False to "
                "prune inside the language model only"
            )
        _vision_layers(tower)
        if options.stage1:
            layer = model.config.vision_feature_layer
            layers = layer if isinstance(layer, (list, tuple)) else [layer]
            depth = model.config.vision_config.num_hidden_layers
            if any(_vision_layer_index(x, depth) < 0 for x in layers):
                raise ValueError(
                    f"vision_feature_layer={layer} reads the vision embeddings, before any attention "
                    "layer; stage 1 needs a layer with attention (use similarity='cosine' or stage1=False)"
                    if options.similarity == "attention" else
                    f"vision_feature_layer={layer} reads the vision embeddings; stage 1 is not defined there"
                )
        cls._check_stage2(model, options)

    @classmethod
    def _check_stage2(cls, model, options: TokenPruningOptions) -> None:
        """The checks of stage 2, which any decoder of Llama-style layers shares."""
        n = model.config.text_config.num_hidden_layers
        if options.stage2 and not 1 <= options.layer <= n - 1:
            raise ValueError(
                f"layer={options.layer}: stage 2 needs 1 <= layer <= {n - 1} for a language model of {n} "
                "layers (layers before it see every token, the attention of layer-1 scores them)"
            )
        if options.stage2 and model.config.text_config._attn_implementation != "eager":
            attn = model.model.language_model.layers[options.layer - 1].self_attn
            if hasattr(attn, "q_norm") or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "scaling")):
                raise ValueError(
                    f"stage 2 reads attention probabilities; {type(attn).__name__} under "
                    f"{model.config.text_config._attn_implementation!r} attention returns none, and its "
                    "scores cannot be recomputed here. Load the model with attn_implementation='eager'"
                )

    def attach(self) -> None:
        o = self.options
        self._handles.append(self.model.register_forward_pre_hook(self._refuse_labels, with_kwargs=True))
        self._handles.append(self._mm.register_forward_pre_hook(self._mm_pre, with_kwargs=True))
        self._handles.append(self._mm.register_forward_hook(self._mm_post, with_kwargs=True))
        if o.stage2:
            k = o.layer
            scorer = self._layers[k - 1]
            self._handles.append(scorer.self_attn.register_forward_hook(self._attn_hook, with_kwargs=True))
            self._handles.append(scorer.register_forward_hook(self._cut_hook))
            for layer in self._layers[k:]:
                self._handles.append(layer.register_forward_pre_hook(self._pruned_pre, with_kwargs=True))
            if self.model.config.text_config._attn_implementation != "eager":
                attn = scorer.self_attn
                self._qk = {}
                for name in ("q_proj", "k_proj"):
                    self._handles.append(getattr(attn, name).register_forward_hook(self._capture(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ctx = self._gen = None

    def clear(self) -> None:
        """Forget the recorded counts."""
        self.records.clear()
        self.last = []

    def stage1_scores(self, **inputs) -> list[torch.Tensor]:
        """Per image of ``inputs`` (what the model's forward takes), the stage-1 score of each of its
        visual tokens in placeholder order: what the knee cuts. Runs the vision tower only.

            scores = pruner.stage1_scores(**batch)   # [tensor of 64 scores], one per image
        """
        with torch.no_grad():
            _, scores, _ = self._image_features(self._mm, self._bind((), inputs))
        self.__dict__.pop("_deepstack_features", None)  # Qwen3-VL's: only a prefill uses them
        return scores

    @staticmethod
    def _refuse_labels(module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                "token pruning is for inference: the logits cover only the kept tokens, so `labels` "
                "cannot line up with them. Call disable_token_pruning(model) to compute a loss"
            )

    def _capture(self, name):
        def hook(_module, _args, output):
            if isinstance(self._ctx, _Prefill):
                self._qk[name] = output
        return hook

    # ------------------------------------------------------------------ multimodal model

    def _bind(self, args, kwargs) -> dict:
        bound = self._signature.bind(*args, **kwargs)
        out = {}
        for name, value in bound.arguments.items():
            if self._signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def _mm_pre(self, module, args, kwargs):
        self._ctx = None
        kw = self._bind(args, kwargs)
        cache = kw.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            return self._decode_inputs(kw)
        self._gen = None
        return self._prefill_inputs(module, kw)

    def _mm_post(self, module, args, kwargs, output):
        ctx, self._ctx = self._ctx, None
        if not isinstance(ctx, _Prefill):
            return None
        counts = self._counts(ctx)
        self.last = counts
        self.records.extend(counts)
        line = "; ".join(
            f"{c.tokens}->{c.stage1_tokens}->{c.stage2_tokens} (visual {c.visual}->{c.stage1_visual}"
            f"->{c.stage2_visual})" for c in counts
        )
        (logger.info if self.options.verbose else logger.debug)(f"token pruning, per sample: {line}")
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self._gen = _Generation(
                cache=weakref.ref(cache), orig_len=ctx.orig_len, mask1=ctx.mask1,
                valid2=ctx.valid2 if ctx.index2 is not None else None,
            )
        features = self.__dict__.pop("_features", None)
        if features is not None and getattr(output, "image_hidden_states", 1) is None:
            output.image_hidden_states = torch.cat(features, 0)  # what the model itself returns
        return output

    def _counts(self, ctx: _Prefill) -> list[SampleCounts]:
        s1 = ctx.valid.sum(1)
        v1 = (ctx.valid & ctx.image).sum(1)
        if ctx.index2 is not None:
            image2 = gather_tokens(ctx.image, ctx.index2) & ctx.valid2
            s2, v2 = ctx.valid2.sum(1), image2.sum(1)
        else:
            s2, v2 = s1, v1
        n = len(self._layers)
        layer = self.options.layer if self.options.stage2 else n
        columns = ctx.columns
        if columns is None:
            columns = torch.arange(ctx.valid.shape[1], device=ctx.valid.device).expand_as(ctx.valid)
        kept1 = [columns[b][ctx.valid[b]].tolist() for b in range(len(s1))]
        if ctx.index2 is not None:
            cols2 = gather_tokens(columns, ctx.index2)
            kept2 = [cols2[b][ctx.valid2[b]].tolist() for b in range(len(s1))]
        else:
            kept2 = kept1
        return [
            SampleCounts(int(ctx.tokens[b]), int(ctx.visual[b]), int(s1[b]), int(v1[b]), int(s2[b]),
                         int(v2[b]), n, layer, tuple(kept1[b]), tuple(kept2[b]))
            for b in range(len(s1))
        ]

    def _prefill_inputs(self, module, kw):
        input_ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (input_ids is None) == (embeds is None):
            return None  # the model raises its own error
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                "token pruning needs a 2-D attention mask [batch, length] (or none); got a "
                f"{mask.dim()}-D mask"
            )
        ref = embeds if embeds is not None else input_ids
        b, n = ref.shape[:2]
        device = ref.device
        valid = mask.bool() if mask is not None else torch.ones(b, n, dtype=torch.bool, device=device)
        pixel_values = kw.get("pixel_values")
        has_pixels = pixel_values is not None and pixel_values.numel() > 0
        image_id = self.model.config.image_token_id
        if not (self.options.stage1 and has_pixels):
            image = input_ids == image_id if input_ids is not None else torch.zeros_like(valid)
            self._ctx = _Prefill(
                tokens=valid.sum(1), visual=(image & valid).sum(1), valid=valid, image=image, orig_len=n,
                mask1=mask if mask is not None else valid.long(),
            )
            return None

        if embeds is None:
            embeds = module.get_input_embeddings()(input_ids)
        features, scores, forced = self._image_features(module, kw)
        flat = torch.cat(features, 0).to(embeds.device, embeds.dtype)
        image = module.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=flat)
        image = (image[0] if isinstance(image, tuple) else image)[..., 0]  # Qwen's: (image, video) masks
        embeds = embeds.masked_scatter(image[..., None], flat)
        self._features = features

        keep_image = self._stage1_keep(scores, forced)
        keep = valid.clone()
        keep[image] = keep_image.to(device)
        keep &= valid

        position_ids = self._prefill_positions(module, kw, embeds)
        ctx = _Prefill(tokens=valid.sum(1), visual=(image & valid).sum(1), valid=valid, image=image,
                       orig_len=n, mask1=mask if mask is not None else valid.long())
        out = dict(kw, input_ids=None, pixel_values=None, inputs_embeds=embeds)
        if self._always_pass_positions:
            out["position_ids"] = position_ids
        if not torch.equal(keep, valid):
            index, new_valid = repack(keep)
            ctx.valid, ctx.image = new_valid, gather_tokens(image, index) & new_valid
            ctx.columns = index
            ctx.mask1 = new_valid.long()
            out.update(inputs_embeds=gather_tokens(embeds, index), attention_mask=ctx.mask1,
                       position_ids=gather_positions(position_ids, index))
        self._ctx = ctx
        self._stage1_done(ctx, keep_image, image)
        return (), out

    def _stage1_keep(self, scores: list, forced: list) -> torch.Tensor:
        """Per image, the knee cut of its scores (the ``forced`` ones always kept), concatenated in
        placeholder order: row-major, the order in which masked_scatter filled the image slots."""
        o = self.options
        keep_img = []
        for s, f in zip(scores, forced):
            keep = f.clone()
            cand = ~f
            if cand.any():
                keep[cand] = keep_mask(s[cand], o.knee, o.min_tokens, o.max_tokens)
            keep_img.append(keep)
        return torch.cat(keep_img)

    def _prefill_positions(self, module, kw, embeds) -> torch.Tensor:
        """The position ids the unpruned prompt gets, to be gathered for the kept tokens."""
        position_ids = kw.get("position_ids")
        if position_ids is None:  # what the language model would use: 0..n-1, padding included
            b, n = embeds.shape[:2]
            position_ids = torch.arange(n, device=embeds.device)[None].expand(b, n)
        return position_ids

    def _stage1_done(self, ctx: _Prefill, keep_image: torch.Tensor, image: torch.Tensor) -> None:
        """Called once stage 1 has chosen its tokens (``keep_image``: per image slot, row-major)."""

    def _image_features(self, module, kw):
        """Per image: projected features, stage-1 scores and always-kept flags, in placeholder order."""
        cfg = self.model.config
        feature_layer = kw.get("vision_feature_layer")
        feature_layer = cfg.vision_feature_layer if feature_layer is None else feature_layer
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
        depth = len(self._vision_layers)
        deepest = max(layers, key=lambda x: _vision_layer_index(x, depth))
        attn = self._vision_layers[_vision_layer_index(deepest, depth)].self_attn
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
            return features, *self._next_layout(module, crop_scores, kw["image_sizes"], strategy, features)
        scores = [crop_scores[i] for i in range(len(features))]
        for f, s in zip(features, scores):
            if f.shape[0] != s.shape[0]:
                raise ValueError(f"{f.shape[0]} image features but {s.shape[0]} scored vision tokens")
        forced = [torch.isinf(s) for s in scores]
        return features, scores, forced

    def _next_layout(self, module, crop_scores, image_sizes, strategy, features):
        """LLaVA-NeXT packs crops (reordered, unpadded, a newline token per row): map scores through
        the model's own ``pack_image_features`` by packing token indices instead of features."""
        cfg = self.model.config
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

    def _decode_inputs(self, kw):
        gen = self._gen
        cache = kw.get("past_key_values")
        if gen is None or gen.cache() is not cache:
            return None  # not a cache we pruned: plain decoding
        if getattr(cache, "is_compileable", False):
            raise ValueError(
                "token pruning needs a DynamicCache (the default); static caches are not supported"
            )
        ref = kw.get("inputs_embeds") if kw.get("input_ids") is None else kw["input_ids"]
        b, q = ref.shape[:2]
        mask = kw.get("attention_mask")
        l1 = gen.mask1.shape[1]
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != gen.orig_len + gen.seen + q:
                raise ValueError(
                    f"decoding after a pruned prefill needs the 2-D attention mask of the whole unpruned "
                    f"sequence ({gen.orig_len + gen.seen + q} columns), got shape {tuple(mask.shape)}"
                )
            mask1 = torch.cat([gen.mask1.to(mask.dtype), mask[:, gen.orig_len:]], 1)
        else:
            tail = torch.ones(b, gen.seen + q, dtype=gen.mask1.dtype, device=gen.mask1.device)
            mask1 = torch.cat([gen.mask1, tail], 1)
        position_ids = kw.get("position_ids")
        if position_ids is None:
            position_ids = self._decode_positions(mask, gen.orig_len + gen.seen, b, q, ref.device)
        gen.seen += q
        ctx = _Decode(mask1=mask1)
        if gen.valid2 is not None:
            ctx.pruned_mask2d = torch.cat([gen.valid2.to(mask1.dtype), mask1[:, l1:]], 1)
        self._ctx = ctx
        return (), dict(kw, attention_mask=mask1, position_ids=position_ids)

    def _decode_positions(self, mask, past: int, b: int, q: int, device) -> torch.Tensor:
        """The unpruned model's default position ids for ``q`` new tokens after ``past`` ones."""
        return (torch.arange(q, device=device) + past)[None].expand(b, q)

    # ------------------------------------------------------------------ stage 2

    def _attn_hook(self, module, args, kwargs, output):
        ctx = self._ctx
        if not isinstance(ctx, _Prefill) or not bool((ctx.image & ctx.valid).any()):
            return None
        with torch.no_grad():
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                weights = self._recompute_attention(module, hidden, kwargs["position_embeddings"], ctx.valid)
            attention = weights.float().mean(1)  # [B, L1, L1]
            ctx.index2, ctx.valid2 = self._stage2_cut(attention, ctx.valid, ctx.image)
        return None

    def _stage2_cut(self, attention, valid, image):
        o = self.options
        b, n = valid.shape
        pos = torch.arange(n, device=valid.device).expand(b, n)
        has_image = (image & valid).any(1)
        first = torch.where(image & valid, pos, n).min(1).values
        last_img = torch.where(image & valid, pos, -1).max(1).values
        last = torch.where(valid, pos, -1).max(1).values
        if o.stage2_queries == "question":
            queries = valid & (pos > last_img[:, None])
        else:
            queries = valid.clone()
        scores = received_attention(attention, queries)
        if o.stage2_candidates == "after_system":
            cand = valid & (pos >= first[:, None]) & (pos != last[:, None])
        else:
            cand = valid & image & (pos != last[:, None])
        cand &= has_image[:, None]  # a text-only sample keeps every token
        keep = valid & ~cand
        rule = o.stage2_knee or o.knee
        for r in range(b):
            if cand[r].any():
                sel = keep_mask(scores[r][cand[r]], rule, o.stage2_min_tokens, o.stage2_max_tokens,
                                o.stage2_keep_ratio)
                keep[r, cand[r].nonzero()[:, 0][sel]] = True
        if torch.equal(keep, valid):
            return None, None
        return repack(keep)

    def _recompute_attention(self, attn, hidden, position_embeddings, valid):
        """Softmax attention of a Llama-style layer from its own q/k projections (non-eager kernels)."""
        b, n, _ = hidden.shape
        hd = attn.head_dim
        q = self._qk["q_proj"].view(b, n, -1, hd).transpose(1, 2)
        k = self._qk["k_proj"].view(b, n, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
        idx = torch.arange(n, device=hidden.device)
        allowed = (idx[:, None] >= idx[None, :])[None, None] & valid[:, None, None, :]
        logits = logits.masked_fill(~allowed, float("-inf"))
        return torch.nan_to_num(logits.softmax(-1))

    def _cut_hook(self, module, args, output):
        ctx = self._ctx
        if not isinstance(ctx, _Prefill) or ctx.index2 is None:
            return None
        if isinstance(output, tuple):
            return (gather_tokens(output[0], ctx.index2), *output[1:])
        return gather_tokens(output, ctx.index2)

    def _pruned_pre(self, module, args, kwargs):
        ctx = self._ctx
        if isinstance(ctx, _Prefill) and ctx.index2 is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            rope = (gather_tokens(cos, ctx.index2), gather_tokens(sin, ctx.index2))
            out = dict(kwargs, position_embeddings=rope)
            if kwargs.get("position_ids") is not None:
                out["position_ids"] = gather_tokens(kwargs["position_ids"], ctx.index2)
            if ctx.pruned_mask is None:
                ctx.pruned_mask = self._mask(hidden, ctx.valid2.long(), kwargs, out.get("position_ids"))
            out["attention_mask"] = ctx.pruned_mask
            return args, out
        if isinstance(ctx, _Decode) and ctx.pruned_mask2d is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if ctx.pruned_mask is None:
                ctx.pruned_mask = self._mask(hidden, ctx.pruned_mask2d, kwargs, kwargs.get("position_ids"))
            return args, dict(kwargs, attention_mask=ctx.pruned_mask)
        return None

    def _mask(self, hidden, mask2d, kwargs, position_ids):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self._lm.config, inputs_embeds=hidden, attention_mask=mask2d,
            past_key_values=kwargs.get("past_key_values"), position_ids=position_ids,
            layer_idx=self.options.layer,
        )


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The position ids of the kept slots: ``[B, L]`` (or ``[1, L]``) as ``gather_tokens``; Qwen's
    M-RoPE ``[R, B, L]`` (R = 3 axes, or 4 with generate's text row first) gathered per row."""
    if position_ids.dim() == 2:
        return gather_tokens(position_ids, index)
    return torch.stack([gather_tokens(p, index) for p in position_ids])


def _vision_layers(tower) -> list:
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"cannot find the encoder layers of the vision tower {type(tower).__name__}")


def _vision_layer_index(feature_layer: int, depth: int) -> int:
    """The encoder layer whose output is ``hidden_states[feature_layer]`` (-1: the embeddings)."""
    return feature_layer % (depth + 1) - 1 if feature_layer < 0 else feature_layer - 1


def attached_pruner(model) -> TokenPruner | None:
    return getattr(model, _ATTR, None)


def set_attached(model, pruner: TokenPruner | None) -> None:
    if pruner is None:
        if hasattr(model, _ATTR):
            delattr(model, _ATTR)
    else:
        # object.__setattr__: a Module's __setattr__ would register the pruner's model as a submodule
        object.__setattr__(model, _ATTR, pruner)
