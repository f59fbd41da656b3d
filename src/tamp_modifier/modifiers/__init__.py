from tamp_modifier.modifiers.diversity_aware_sparsity import DiversityAwareSparsity

__all__ = ["DiversityAwareSparsity"]
