"""Kept-token counts per sample, token shares and prefill FLOPs.

The FLOP count is the usual one for a decoder layer seeing ``n`` tokens, width
``d`` and MLP width ``m`` (FastV's): ``4 n d^2 + 2 n^2 d + 2 n d m``, summed over
layers, each with the number of tokens it sees.

    >>> c = SampleCounts(tokens=10, visual=8, stage1_tokens=6, stage1_visual=4,
    ...                  stage2_tokens=4, stage2_visual=2, num_layers=4, layer=2)
    >>> c.tokens_per_layer()
    [6, 6, 4, 4]
    >>> c.layer_share()
    0.5
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["SampleCounts", "layer_flops", "prefill_flops"]


def layer_flops(n: int, d: int, m: int) -> int:
    """Prefill FLOPs of one decoder layer on ``n`` tokens: ``4nd^2 + 2n^2 d + 2ndm``."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(tokens_per_layer: list[int], d: int, m: int) -> int:
    """Sum of ``layer_flops`` over layers, each with its own token count."""
    return sum(layer_flops(n, d, m) for n in tokens_per_layer)


@dataclass(frozen=True)
class SampleCounts:
    """Tokens of one sample (padding excluded) at each stage.

    ``tokens``/``visual``: the prompt at the language model's input without
    pruning; ``stage1_*``: at the language model's input after the CLS cut;
    ``stage2_*``: what layers ``layer`` and later see after the text-relevance cut
    (equal to ``stage1_*`` when stage 2 is off or the sample has no image).
    ``kept_stage1``/``kept_stage2``: the input columns (indices into the
    sample's ``input_ids`` row) of the tokens kept, in order.
    """

    tokens: int
    visual: int
    stage1_tokens: int
    stage1_visual: int
    stage2_tokens: int
    stage2_visual: int
    num_layers: int
    layer: int
    kept_stage1: tuple[int, ...] = field(default=(), repr=False, compare=False)
    kept_stage2: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def tokens_per_layer(self) -> list[int]:
        """Tokens each decoder layer sees in prefill."""
        return [self.stage1_tokens if i < self.layer else self.stage2_tokens for i in range(self.num_layers)]

    def visual_share(self) -> float | None:
        """Share of visual tokens kept at the language model's input (None without an image)."""
        return self.stage1_visual / self.visual if self.visual else None

    def input_share(self) -> float:
        """Share of all tokens kept at the language model's input."""
        return self.stage1_tokens / self.tokens

    def layer_share(self) -> float:
        """Tokens seen, averaged over layers, as a share of the unpruned prompt."""
        return sum(self.tokens_per_layer()) / (self.num_layers * self.tokens)

    def flops(self, d: int, m: int) -> int:
        """Prefill FLOPs of the decoder layers for this sample."""
        return prefill_flops(self.tokens_per_layer(), d, m)

    def as_dict(self) -> dict:
        return asdict(self)
