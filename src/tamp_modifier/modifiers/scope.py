"""``scope``: what our modifiers (and the pruner after DAS) may prune.

``text_decoder`` (the default) confines pruning to the Linears inside the text
decoder's layers, found from the model's structure (``tamp_modifier.placement``),
whatever the recipe's ``ignore`` patterns miss: the modifier's ``ignore`` is
extended, for the run, with one pattern per subtree outside the decoder
(towers, projectors, connectors, heads). The list as written is put back at
finalize, so the saved ``recipe.yaml`` reads as the user wrote it. ``targets``
prunes exactly what ``targets``/``ignore`` match, for whoever means to prune a
tower; a module the modifiers cannot score there (outside every decoder layer)
is then refused by name.
"""

from __future__ import annotations

import torch
from llmcompressor.modifiers import Modifier
from loguru import logger

from tamp_modifier.placement import TextDecoder, find_text_decoder, outside_decoder_patterns

__all__ = ["SCOPES", "confine_to_text_decoder", "modules_outside_decoder", "restore_ignore"]

SCOPES = ("text_decoder", "targets")


def confine_to_text_decoder(modifier: Modifier, model: torch.nn.Module) -> TextDecoder:
    """Extend ``modifier.ignore`` by the subtrees outside the text decoder; remember the original."""
    decoder = find_text_decoder(model)
    written = list(modifier.ignore or [])
    added = [p for p in outside_decoder_patterns(model, decoder) if p not in written]
    if getattr(modifier, "_tamp_ignore_as_written", None) is None:
        modifier._tamp_ignore_as_written = written
    modifier.ignore = [*written, *added]
    if added:
        roots = ", ".join(p[len("re:^"):-len("(\\..*)?$")].replace("\\", "") for p in added)
        logger.info(f"{type(modifier).__name__}: pruning only the text decoder's layers ({decoder.layers}, "
                    f"{decoder.num_layers} x {decoder.layer_class}); left dense: {roots}")
    return decoder


def restore_ignore(modifier: Modifier) -> None:
    """Put back the ``ignore`` list as written (for the saved recipe)."""
    written = getattr(modifier, "_tamp_ignore_as_written", None)
    if written is not None:
        modifier.ignore = written
        modifier._tamp_ignore_as_written = None


def modules_outside_decoder(model: torch.nn.Module, names) -> list[str]:
    """The given module names that lie outside every text-decoder layer ([] if none or unplaceable)."""
    try:
        decoder = find_text_decoder(model)
    except ValueError:
        return []
    return [n for n in names if not decoder.contains(n.rstrip("."))]
