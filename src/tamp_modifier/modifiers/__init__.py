from tamp_modifier.modifiers.adaptive_input_activation import AdaptiveInputActivation
from tamp_modifier.modifiers.diversity_aware_sparsity import DiversityAwareSparsity

__all__ = ["AdaptiveInputActivation", "DiversityAwareSparsity"]
