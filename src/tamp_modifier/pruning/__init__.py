"""The mathematics of TAMP and its baselines: small pure functions on tensors.

No llm-compressor here: ``diversity`` (DAS's terms, streamed), ``allocation``
(scores to per-layer ratios), ``token_selection`` (AMIA's greedy selection),
``selection_accumulator`` (AMIA's per-sample loop: tokens chosen, rows handed on, counts),
``wanda_rule`` (Wanda's masks from channel norms), ``token_weighting``,
``modality`` (token labels) and ``sparsity_pattern`` (measuring what a pruner left).
"""
