"""What a pruned prefill hands to the decoding steps after it, and how each step's inputs are translated.

``generate`` knows nothing of the pruning: every step it passes the attention
mask and (or no) position ids of the whole *unpruned* sequence. The cache the
prefill filled is shorter: ``L1`` slots in the layers before the stage-2 cut,
``L2`` in the layers after it. ``Generation`` remembers what the prefill did
(the prompt's length as given, its mask at the language model's input, the
stage-2 survivors) and turns each step's inputs into the pruned cache's: the
mask of the ``L1`` layers, the separate 2-D mask of the ``L2`` layers, and the
position ids the unpruned model would have used (so positions continue from the
unpruned prompt, as they do in the prefill).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["DecodeStep", "Generation", "text_positions"]


@dataclass
class DecodeStep:
    """The masks of one decoding step after a pruned prefill."""

    mask1: torch.Tensor | None  # [B, L1 + seen + q]: the language model's (and the uncut layers') mask
    pruned_mask: object = None  # the 4-D mask of the pruned layers (built once, by the first of them)
    pruned_mask2d: torch.Tensor | None = None  # [B, L2 + seen + q]: what it is built from; None: no cut


# (mask, past, batch, new tokens, device) -> position ids of the new tokens in the unpruned sequence
DecodePositions = Callable[[torch.Tensor | None, int, int, int, torch.device], torch.Tensor]


def text_positions(past: int, b: int, q: int, device) -> torch.Tensor:
    """The unpruned model's default position ids for ``q`` new tokens after ``past`` ones."""
    return (torch.arange(q, device=device) + past)[None].expand(b, q)


@dataclass
class Generation:
    """What the decoding steps after one pruned prefill need (one per cache the prefill filled)."""

    cache: object  # weakref to the cache the prefill filled
    orig_len: int  # the prompt's length as given
    mask1: torch.Tensor  # [B, L1] the prompt's mask at the language model's input
    valid2: torch.Tensor | None  # [B, L2] the stage-2 survivors (None: no cut)
    seen: int = 0  # tokens fed after the prefill

    def continues(self, cache) -> bool:
        """Whether ``cache`` is the one this prefill filled (else: plain decoding, nothing to translate)."""
        return self.cache() is cache

    def step_inputs(self, kw: dict, positions: DecodePositions) -> tuple[dict, DecodeStep]:
        """The multimodal model's keywords for this step, translated to the pruned cache, and its masks.

        ``kw``: the bound keywords ``generate`` passed; ``positions``: the unpruned model's position
        ids for new tokens, used where ``kw`` has none.
        """
        cache = kw.get("past_key_values")
        if getattr(cache, "is_compileable", False):
            raise ValueError(
                "token pruning needs a DynamicCache (the default); static caches are not supported"
            )
        ref = kw.get("inputs_embeds") if kw.get("input_ids") is None else kw["input_ids"]
        b, q = ref.shape[:2]
        mask = kw.get("attention_mask")
        l1 = self.mask1.shape[1]
        if mask is not None:
            if mask.dim() != 2 or mask.shape[1] != self.orig_len + self.seen + q:
                raise ValueError(
                    f"decoding after a pruned prefill needs the 2-D attention mask of the whole unpruned "
                    f"sequence ({self.orig_len + self.seen + q} columns), got shape {tuple(mask.shape)}"
                )
            # the prompt's columns become its kept slots; the tokens decoded since keep theirs
            mask1 = torch.cat([self.mask1.to(mask.dtype), mask[:, self.orig_len:]], 1)
        else:
            tail = torch.ones(b, self.seen + q, dtype=self.mask1.dtype, device=self.mask1.device)
            mask1 = torch.cat([self.mask1, tail], 1)
        position_ids = kw.get("position_ids")
        if position_ids is None:
            position_ids = positions(mask, self.orig_len + self.seen, b, q, ref.device)
        self.seen += q
        step = DecodeStep(mask1=mask1)
        if self.valid2 is not None:
            step.pruned_mask2d = torch.cat([self.valid2.to(mask1.dtype), mask1[:, l1:]], 1)
        return dict(kw, attention_mask=mask1, position_ids=position_ids), step
