"""``scope``: what our modifiers, the pruner after DAS and the quantizers after them may touch.

``text_decoder`` (the default) confines pruning to the Linears inside the text
decoder's layers, found from the model's structure (``tamp_modifier.text_decoder``),
whatever the recipe's ``ignore`` patterns miss: the ``ignore`` list of our
modifier, of the pruner after DAS, and of every quantization step after them
(``QuantizationModifier``, ``GPTQModifier``) is extended with one pattern per
subtree outside the decoder (towers, projectors, connectors, heads), so those
stay dense and unquantized as the shipped recipes mean them to. The patterns
stay in the saved ``recipe.yaml``: it says what was left out, and re-running it
gives the same model. ``targets`` prunes exactly what ``targets``/``ignore``
match, for whoever means to prune a tower; a module the modifiers cannot score
there (outside every decoder layer) is then refused by name.
"""

from __future__ import annotations

import torch
from llmcompressor.core import active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from loguru import logger

from tamp_modifier.text_decoder import (
    TextDecoder,
    find_text_decoder,
    ignore_pattern,
    outside_decoder_roots,
)

__all__ = ["SCOPES", "confine_to_text_decoder", "modules_outside_decoder"]

SCOPES = ("text_decoder", "targets")


def _extended(ignore: list[str] | None, patterns: list[str]) -> tuple[list[str], list[str]]:
    """``ignore`` with the patterns it lacks appended, and those patterns."""
    written = list(ignore or [])
    added = [p for p in patterns if p not in written]
    return [*written, *added], added


def _extend_ignore(modifier: Modifier, patterns: list[str]) -> list[str]:
    """Add the patterns ``modifier.ignore`` lacks; return those added."""
    modifier.ignore, added = _extended(modifier.ignore, patterns)
    if isinstance(modifier, QuantizationMixin):
        # Its config (targets, ignore) may have been resolved already, and is then
        # what it applies: it must leave the same modules out.
        config = modifier.resolved_config
        config.ignore, _ = _extended(config.ignore, patterns)
    return added


def confine_to_text_decoder(owner: Modifier, model: torch.nn.Module, pruner: Modifier | None = None,
                            ) -> TextDecoder:
    """Keep ``owner`` (or the ``pruner`` it hands ratios to) and every quantizer after it in the
    recipe inside the text decoder's layers."""
    decoder = find_text_decoder(model)
    roots = outside_decoder_roots(model, decoder)
    patterns = [ignore_pattern(root) for root in roots]
    modifiers = list(active_session().lifecycle.recipe.modifiers or [])
    after = modifiers[modifiers.index(owner) + 1:] if owner in modifiers else []
    # A quantizer with nothing configured is left to raise llm-compressor's own error.
    quantizers = [m for m in after if isinstance(m, QuantizationMixin) and m.has_config()]
    for step in [pruner or owner, *quantizers]:
        if _extend_ignore(step, patterns):
            logger.info(f"{type(step).__name__}: only the text decoder's layers ({decoder.layers}, "
                        f"{decoder.num_layers} x {decoder.layer_class}); left as they are: "
                        f"{', '.join(roots)}")
    return decoder


def modules_outside_decoder(model: torch.nn.Module, names) -> list[str]:
    """The given module names that lie outside every text-decoder layer ([] if none or unplaceable)."""
    try:
        decoder = find_text_decoder(model)
    except ValueError:
        return []
    return [n for n in names if not decoder.contains(n.rstrip("."))]
