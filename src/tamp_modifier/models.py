"""What we know about the supported vision-language model classes."""

from __future__ import annotations

import torch

__all__ = ["TOWER_IGNORE", "language_linears", "text_decoder_layer_class"]

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
    """
    for name, module in model.named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            return type(module[0]).__name__
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList) and "visual" not in name:
            return type(module[0]).__name__
    raise ValueError(
        f"cannot find the text decoder layers of {type(model).__name__}; pass "
        "sequential_targets explicitly (the decoder layer class name)"
    )


def language_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linears the shipped recipes prune: all but towers, projector and lm_head."""
    from compressed_tensors.utils import match_named_modules

    return {n: m for n, m in match_named_modules(model, ["Linear"], TOWER_IGNORE)
            if isinstance(m, torch.nn.Linear)}
