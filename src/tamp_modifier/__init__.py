"""TAMP token-adaptive layerwise pruning for multimodal LLMs, for llm-compressor.

Importing this package registers its modifiers with llm-compressor (when
llm-compressor is imported, see ``plugin``), so YAML recipes given to
``oneshot()`` can name them::

    import tamp_modifier  # noqa: F401  (registers DiversityAwareSparsity, AdaptiveInputActivation)
    from llmcompressor import oneshot
    oneshot(model=model, dataset=ds, recipe="recipes/das_wanda.yaml", ...)

The parts, one folder each: ``pruning`` (the mathematics, plain functions on
tensors), ``modifiers`` (the llm-compressor adapters around it), ``report`` (the
per-layer report), ``deploy`` (checkpoints for transformers and vLLM, 2:4
tensors), ``token_pruning`` (inference-time visual-token pruning, no
llm-compressor needed), ``cli`` (``tamp-prune``), ``demo`` and ``testing``
(the trained demo model; tiny models and baselines for tests and benchmarks).
"""

from __future__ import annotations

import importlib

from tamp_modifier.plugin import register_with_llmcompressor

__version__ = "0.1.0"

# The public names, each imported on first use: the modifiers need llm-compressor,
# the rest do not.
_PUBLIC = {
    "AdaptiveInputActivation": "tamp_modifier.modifiers",
    "DiversityAwareSparsity": "tamp_modifier.modifiers",
    "allocate_sparsity": "tamp_modifier.pruning.allocation",
    "load_report": "tamp_modifier.report.saved",
    "modality_diversity": "tamp_modifier.pruning.diversity",
    "reallocate": "tamp_modifier.report.saved",
    "select_tokens": "tamp_modifier.pruning.token_selection",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tamp_modifier' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


register_with_llmcompressor()
