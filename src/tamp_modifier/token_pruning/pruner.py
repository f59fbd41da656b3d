"""The pruner of one enabled model: its options checked, its hooks attached and removed, its counts.

Nothing of the model is replaced: ``TokenPruner.attach`` registers forward
hooks and pre-hooks, ``detach`` removes them, and the model is then exactly the
one that was loaded. The work is in three pieces, each in its own module:

- ``stage1.Stage1``: before the language model, the vision-side cut (run by the
  multimodal model's pre-hook here);
- ``stage2.Stage2``: inside the language model, the cut after layer ``layer - 1``
  (hooks on the decoder layers);
- ``decode_state.Generation``: after a pruned prefill, each decoding step's mask
  and positions translated to the pruned cache.

They share one ``forward_state.ForwardState``: the multimodal pre-hook decides
the phase of each forward (a prefill, a step after a pruned prefill, or neither)
and the post-hook ends it, recording the prefill's counts and handing the
prefill's cache to a ``Generation``.

``TokenPruner`` is LLaVA / LLaVA-NeXT's; ``qwen_vl.QwenVLTokenPruner`` is
Qwen-VL's, with its own stage 1, positions and DeepStack hooks.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch
from loguru import logger

from tamp_modifier.token_pruning.accounting import SampleCounts
from tamp_modifier.token_pruning.decode_state import Generation, text_positions
from tamp_modifier.token_pruning.forward_state import ForwardState, Phase, Prefill
from tamp_modifier.token_pruning.options import LLAVA_SUPPORTED, QWEN_SUPPORTED, TokenPruningOptions
from tamp_modifier.token_pruning.stage1 import Stage1, vision_layer_index, vision_layers
from tamp_modifier.token_pruning.stage2 import Stage2, check_stage2
from tamp_modifier.token_pruning.token_drop import gather_tokens

__all__ = ["TokenPruner", "attached_pruner", "set_attached"]

_ATTR = "_tamp_token_pruner"


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

    stage1_class = Stage1  # the family's stage 1

    def __post_init__(self):
        self._handles = []
        self.state = ForwardState()  # the forward under way
        self.generation: Generation | None = None  # the latest pruned prefill's, while its cache lives
        mm = self.model.model
        self._mm = mm
        self._lm = mm.language_model
        self._layers = list(self._lm.layers)
        self._signature = inspect.signature(mm.forward)
        self.stage1 = self.stage1_class(self.model, self.options)
        eager = self.model.config.text_config._attn_implementation == "eager"
        self.stage2 = Stage2(self._lm, self.options, self.state, eager=eager)

    # ------------------------------------------------------------------ set-up

    @classmethod
    def check_model(cls, model, options: TokenPruningOptions) -> None:
        """Raise a ValueError naming the problem if ``model`` cannot take these options."""
        name = type(model).__name__
        if name not in LLAVA_SUPPORTED:
            raise ValueError(
                f"token pruning supports {', '.join(LLAVA_SUPPORTED + QWEN_SUPPORTED)}; {name} is none of "
                "them (its tower, merger and position ids have not been mapped). Use a model of those "
                "families"
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
        vision_layers(tower)
        if options.stage1:
            layer = model.config.vision_feature_layer
            layers = layer if isinstance(layer, (list, tuple)) else [layer]
            depth = model.config.vision_config.num_hidden_layers
            if any(vision_layer_index(x, depth) < 0 for x in layers):
                raise ValueError(
                    f"vision_feature_layer={layer} reads the vision embeddings, before any attention "
                    "layer; stage 1 needs a layer with attention (use similarity='cosine' or stage1=False)"
                    if options.similarity == "attention" else
                    f"vision_feature_layer={layer} reads the vision embeddings; stage 1 is not defined there"
                )
        check_stage2(model, options)

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._refuse_labels, with_kwargs=True))
        self._handles.append(self._mm.register_forward_pre_hook(self._mm_pre, with_kwargs=True))
        self._handles.append(self._mm.register_forward_hook(self._mm_post, with_kwargs=True))
        if self.options.stage2:
            self._handles.extend(self.stage2.attach())

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.state.end()
        self.generation = None

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
            return self.stage1.image_features(self._mm, self._bind((), inputs)).scores

    @staticmethod
    def _refuse_labels(module, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError(
                "token pruning is for inference: the logits cover only the kept tokens, so `labels` "
                "cannot line up with them. Call disable_token_pruning(model) to compute a loss"
            )

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
        """Decides the phase of this forward and returns its (translated) inputs, or None to leave them."""
        self.state.end()
        kw = self._bind(args, kwargs)
        cache = kw.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            gen = self.generation
            if gen is None or not gen.continues(cache):
                return None  # not a cache we pruned: plain decoding
            out, step = gen.step_inputs(kw, self._decode_positions)
            self.state.start_decode(step)
            return (), out
        self.generation = None
        return self._prefill_inputs(module, kw)

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
        valid = mask.bool() if mask is not None else torch.ones(b, n, dtype=torch.bool, device=ref.device)
        pixel_values = kw.get("pixel_values")
        has_pixels = pixel_values is not None and pixel_values.numel() > 0
        if not (self.options.stage1 and has_pixels):  # the prompt goes in whole; stage 2 may still cut
            image_id = self.model.config.image_token_id
            image = input_ids == image_id if input_ids is not None else torch.zeros_like(valid)
            self.state.start_prefill(Prefill.of_prompt(valid, image, mask))
            return None
        prefill, out = self.stage1.prune_inputs(module, kw, valid)
        self.state.start_prefill(prefill)
        return (), out

    def _mm_post(self, module, args, kwargs, output):
        """Ends the forward; after a prefill, records its counts and keeps what decoding needs."""
        phase, prefill = self.state.phase, self.state.prefill
        self.state.end()
        if phase is not Phase.PREFILL:
            return None
        counts = self._counts(prefill)
        self.last = counts
        self.records.extend(counts)
        line = "; ".join(
            f"{c.tokens}->{c.stage1_tokens}->{c.stage2_tokens} (visual {c.visual}->{c.stage1_visual}"
            f"->{c.stage2_visual})" for c in counts
        )
        (logger.info if self.options.verbose else logger.debug)(f"token pruning, per sample: {line}")
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self.generation = Generation(
                cache=weakref.ref(cache), orig_len=prefill.orig_len, mask1=prefill.mask1,
                valid2=prefill.valid2 if prefill.index2 is not None else None,
            )
        features = prefill.image_features
        if features is not None and getattr(output, "image_hidden_states", 1) is None:
            output.image_hidden_states = torch.cat(features, 0)  # what the model itself returns
        return output

    def _decode_positions(self, mask, past: int, b: int, q: int, device) -> torch.Tensor:
        """The unpruned model's default position ids for ``q`` new tokens after ``past`` ones."""
        return text_positions(past, b, q, device)

    # ------------------------------------------------------------------ counts

    def _counts(self, prefill: Prefill) -> list[SampleCounts]:
        s1 = prefill.valid.sum(1)
        v1 = (prefill.valid & prefill.image).sum(1)
        if prefill.index2 is not None:
            image2 = gather_tokens(prefill.image, prefill.index2) & prefill.valid2
            s2, v2 = prefill.valid2.sum(1), image2.sum(1)
        else:
            s2, v2 = s1, v1
        n = len(self._layers)
        layer = self.options.layer if self.options.stage2 else n
        columns = prefill.columns
        if columns is None:  # stage 1 dropped nothing: slot j is input column j
            valid = prefill.valid
            columns = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
        kept1 = [columns[b][prefill.valid[b]].tolist() for b in range(len(s1))]
        if prefill.index2 is not None:
            cols2 = gather_tokens(columns, prefill.index2)
            kept2 = [cols2[b][prefill.valid2[b]].tolist() for b in range(len(s1))]
        else:
            kept2 = kept1
        return [
            SampleCounts(int(prefill.tokens[b]), int(prefill.visual[b]), int(s1[b]), int(v1[b]), int(s2[b]),
                         int(v2[b]), n, layer, tuple(kept1[b]), tuple(kept2[b]))
            for b in range(len(s1))
        ]


def attached_pruner(model) -> TokenPruner | None:
    return getattr(model, _ATTR, None)


def set_attached(model, pruner: TokenPruner | None) -> None:
    if pruner is None:
        if hasattr(model, _ATTR):
            delattr(model, _ATTR)
    else:
        # object.__setattr__: a Module's __setattr__ would register the pruner's model as a submodule
        object.__setattr__(model, _ATTR, pruner)
