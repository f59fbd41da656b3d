"""The llm-compressor modifiers: thin adapters between its lifecycle and ``tamp_modifier.pruning``.

Importing this package registers them with llm-compressor's recipe parser and
applies the two tracer mends audio models need (``tracer_mends``).
"""

from tamp_modifier.modifiers.adaptive_input_activation import AdaptiveInputActivation
from tamp_modifier.modifiers.diversity_aware_sparsity import DiversityAwareSparsity
from tamp_modifier.modifiers.registry import register_modifiers
from tamp_modifier.modifiers.tracer_mends import bake_empty_keyword_arguments, keep_model_output_classes

__all__ = ["AdaptiveInputActivation", "DiversityAwareSparsity"]

register_modifiers(DiversityAwareSparsity, AdaptiveInputActivation)
# Audio-language models through llm-compressor's tracer (Qwen2-Audio, Qwen2.5-Omni).
keep_model_output_classes()
bake_empty_keyword_arguments()
