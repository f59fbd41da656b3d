"""TAMP token-adaptive layerwise pruning for multimodal LLMs, for llm-compressor.

Importing this package registers its modifiers with llm-compressor, so YAML
recipes given to ``oneshot()`` can name them::

    import tamp_modifier  # noqa: F401  (registers DiversityAwareSparsity, AdaptiveInputActivation)
    from llmcompressor import oneshot
    oneshot(model=model, dataset=ds, recipe="recipes/das_wanda.yaml", ...)
"""

from tamp_modifier.allocation import allocate_sparsity
from tamp_modifier.diversity import modality_diversity
from tamp_modifier.modifiers import AdaptiveInputActivation, DiversityAwareSparsity
from tamp_modifier.registry import register_modifiers
from tamp_modifier.report import load_report, reallocate
from tamp_modifier.token_selection import select_tokens
from tamp_modifier.tracing import bake_empty_keyword_arguments, keep_model_output_classes

__version__ = "0.1.0"

__all__ = [
    "AdaptiveInputActivation",
    "DiversityAwareSparsity",
    "allocate_sparsity",
    "load_report",
    "modality_diversity",
    "reallocate",
    "select_tokens",
]

register_modifiers(DiversityAwareSparsity, AdaptiveInputActivation)
# Audio-language models through llm-compressor's tracer (Qwen2-Audio, Qwen2.5-Omni): see tracing.py.
keep_model_output_classes()
bake_empty_keyword_arguments()
