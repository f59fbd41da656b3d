"""Where the text decoder is: the layers TAMP prunes, found from the model's structure.

Vision, audio and video towers, projectors, connectors and heads are called
something else in every family (``vision_tower``, ``visual``, ``vision_model``,
``connector``, ``audio_tower``, ``multi_modal_projector``, ...), so name patterns
miss some and prune them silently. transformers says which submodule is the text
decoder (``get_decoder()``); its decoder layers are the one ``ModuleList`` of
identical blocks under it. Everything else stays dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

__all__ = [
    "TOWER_IGNORE", "TextDecoder", "find_text_decoder", "ignore_pattern", "language_linears",
    "outside_decoder_patterns", "outside_decoder_roots", "text_decoder_layer_class",
]

_REFUSAL = (
    "cannot place the text decoder of {cls}: {why}. Name its decoder layer class with "
    "sequential_targets (tamp-prune --sequential-targets CLASS) and keep everything that is not "
    "the text decoder out with the recipe's ignore list, and set scope: targets on "
    "DiversityAwareSparsity / AdaptiveInputActivation so that they prune what targets/ignore say"
)


@dataclass(frozen=True)
class TextDecoder:
    """The text decoder of a model: its module name, its layers' list, and their class."""

    name: str  # e.g. "model.language_model" ("" when the model is the decoder itself)
    layers: str  # e.g. "model.language_model.layers"
    layer_class: str  # e.g. "LlamaDecoderLayer": what sequential_targets should name
    num_layers: int

    def contains(self, module_name: str) -> bool:
        """True if ``module_name`` lies inside one of the decoder layers."""
        return module_name.startswith(self.layers + ".")


def _block_lists(decoder: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The decoder's direct children that are non-empty lists of blocks of one class."""
    return [(n, m) for n, m in decoder.named_children()
            if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def find_text_decoder(model: torch.nn.Module) -> TextDecoder:
    """The text decoder of ``model`` (a transformers model), or a ValueError saying the way out."""
    cls = type(model).__name__
    thinker = getattr(model, "thinker", None)
    if isinstance(thinker, PreTrainedModel):
        # Qwen2.5-Omni / Qwen3-Omni: the talker (a second language model) and its vocoder only voice
        # what the thinker wrote; the thinker is the multimodal LLM, and the one to prune.
        raise ValueError(
            f"{cls} is a thinker and a talker: prune its thinker ({type(thinker).__name__}), e.g. "
            "oneshot(model=model.thinker, ...), or save model.thinker and give tamp-prune that folder")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        raise ValueError(_REFUSAL.format(cls=cls, why="it has no get_decoder() naming its text decoder"))
    lists = _block_lists(decoder)
    # Some return a whole causal LM (Llama 4: a Llama4ForCausalLM holding a Llama4TextModel):
    # the decoder is then the one transformers model inside it.
    while not lists:
        inner = [m for _, m in decoder.named_children() if isinstance(m, PreTrainedModel)]
        if len(inner) != 1:
            break
        decoder, lists = inner[0], _block_lists(inner[0])
    name = _name_of(model, decoder)
    if name is None:
        raise ValueError(_REFUSAL.format(cls=cls, why="get_decoder() returned a module outside the model"))
    if len(lists) != 1:
        found = ", ".join(n for n, _ in lists) or "none"
        raise ValueError(_REFUSAL.format(
            cls=cls, why=f"its decoder {type(decoder).__name__} has {len(lists)} lists of identical "
                         f"blocks ({found}), not one"))
    child, layers = lists[0]
    return TextDecoder(name=name, layers=f"{name}.{child}" if name else child,
                       layer_class=type(layers[0]).__name__, num_layers=len(layers))


def outside_decoder_roots(model: torch.nn.Module, decoder: TextDecoder | None = None) -> list[str]:
    """The largest submodules that hold Linears and no decoder layer (``model.vision_model``,
    ``model.connector``, ``lm_head``): everything outside the decoder layers, by subtree."""
    decoder = decoder or find_text_decoder(model)
    layers = decoder.layers
    roots: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or decoder.contains(name):
            continue
        parts = name.split(".")
        # The shortest prefix that is not an ancestor of the decoder layers.
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if not (layers == prefix or layers.startswith(prefix + ".")):
                break
        if prefix not in roots:
            roots.append(prefix)
    return roots


def ignore_pattern(root: str) -> str:
    """An anchored ``re:`` pattern for ``root`` and everything under it; it also matches
    llm-compressor's ``name.`` form of a module name."""
    return f"re:^{re.escape(root)}(\\..*)?$"


def outside_decoder_patterns(model: torch.nn.Module, decoder: TextDecoder | None = None) -> list[str]:
    """``ignore`` patterns for ``outside_decoder_roots``."""
    return [ignore_pattern(root) for root in outside_decoder_roots(model, decoder)]


# The name patterns the shipped recipes list (readable, and what llm-compressor's
# own pruners and quantizers see). Our modifiers do not rely on them: with
# scope: text_decoder they prune only inside the text decoder (find_text_decoder above).
# Keep vision/audio towers, projectors and lm_head dense. transformers 5 names
# them model.vision_tower.*, model.multi_modal_projector.*, Qwen model.visual.*;
# `re:` patterns match from the start of the name, hence the leading `.*`.
TOWER_IGNORE = [
    "re:.*vision_tower.*",
    "re:.*multi_modal_projector.*",
    "re:.*visual.*",
    "re:.*audio_tower.*",
    "re:.*lm_head",
]


def text_decoder_layer_class(model: torch.nn.Module) -> str:
    """Class name of the language model's decoder layer (``sequential_targets``).

    llm-compressor's default sequential targets also split at vision blocks;
    vision-language models calibrate correctly only with the text layer here.
    Found from the model's structure (``find_text_decoder``); a model
    whose decoder cannot be placed is refused with the way out.
    """
    return find_text_decoder(model).layer_class


def language_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linears the shipped recipes prune: those inside the text decoder's layers.

    For a model whose decoder cannot be placed (run with ``scope: targets``, or a plain
    stack of Linears), every Linear the name patterns ``TOWER_IGNORE`` leave.
    """
    try:
        decoder = find_text_decoder(model)
    except ValueError:
        from compressed_tensors.utils import match_named_modules

        return {n: m for n, m in match_named_modules(model, ["Linear"], TOWER_IGNORE)
                if isinstance(m, torch.nn.Linear)}
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and decoder.contains(n)}
