"""The options of visual-token pruning, checked once when they are made, and the families it knows.

    >>> TokenPruningOptions(knee="iqr", layer=3).stage2_knee or "iqr"
    'iqr'
"""

from __future__ import annotations

from dataclasses import dataclass

from tamp_modifier.token_pruning.knee import KNEE_RULES
from tamp_modifier.validation import at_least, in_range, one_of

__all__ = ["LLAVA_SUPPORTED", "QWEN_SUPPORTED", "SIMILARITIES", "STAGE2_CANDIDATES", "STAGE2_QUERIES",
           "TokenPruningOptions"]

LLAVA_SUPPORTED = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
QWEN_SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                  "Qwen3VLForConditionalGeneration")
# "attention"/"cosine" are read by the tower: against CLS where it has one (LLaVA), else as their CLS-free
# forms "received_attention"/"mean_cosine" (Qwen-VL, see qwen_vl.py), which can also be named outright.
SIMILARITIES = ("attention", "cosine", "received_attention", "mean_cosine")
STAGE2_QUERIES = ("question", "all")
STAGE2_CANDIDATES = ("after_system", "visual")


@dataclass(frozen=True)
class TokenPruningOptions:
    """Every option of the spec, with its default (see ``enable_token_pruning``)."""

    stage1: bool = True
    similarity: str = "attention"
    knee: str = "kneedle"
    min_tokens: int = 1
    max_tokens: int | None = None
    stage2: bool = True
    layer: int = 2
    stage2_knee: str | None = None
    stage2_min_tokens: int = 1
    stage2_max_tokens: int | None = None
    stage2_queries: str = "question"
    stage2_candidates: str = "after_system"
    stage2_keep_ratio: float | None = None
    verbose: bool = False

    def __post_init__(self):
        one_of("similarity", self.similarity, SIMILARITIES)
        one_of("knee", self.knee, KNEE_RULES)
        if self.stage2_knee is not None:
            one_of("stage2_knee", self.stage2_knee, KNEE_RULES)
        one_of("stage2_queries", self.stage2_queries, STAGE2_QUERIES)
        one_of("stage2_candidates", self.stage2_candidates, STAGE2_CANDIDATES)
        for low in ("min_tokens", "stage2_min_tokens"):
            at_least(low, getattr(self, low), 0)
        for low, high in (("min_tokens", "max_tokens"), ("stage2_min_tokens", "stage2_max_tokens")):
            if getattr(self, high) is not None:
                at_least(high, getattr(self, high), getattr(self, low), why=f"it may not be below {low}")
        if self.stage2_keep_ratio is not None:
            in_range("stage2_keep_ratio", self.stage2_keep_ratio, 0.0, 1.0, high_inclusive=True)
        if not (self.stage1 or self.stage2):
            raise ValueError("both stages are off: set stage1=True or stage2=True (or do not enable pruning)")
