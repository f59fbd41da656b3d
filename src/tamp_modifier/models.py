"""What we know about the supported vision-language model classes."""

from __future__ import annotations

import torch

from tamp_modifier.placement import find_text_decoder

__all__ = ["TOWER_IGNORE", "language_linears", "text_decoder_layer_class"]

# The name patterns the shipped recipes list (readable, and what llm-compressor's
# own pruners and quantizers see). Our modifiers do not rely on them: with
# scope: text_decoder they prune only inside the text decoder (placement.py).
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
    Found from the model's structure (``placement.find_text_decoder``); a model
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
