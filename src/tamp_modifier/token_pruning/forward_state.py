"""What the hooks of one forward share: which phase it is in, and that phase's state.

A forward of an enabled model is in one of three phases, set by the multimodal
model's pre-hook and reset by its post-hook:

- ``IDLE``: between forwards, or a forward the pruner leaves alone (decoding on
  a cache it did not prune, inputs the model itself refuses);
- ``PREFILL``: a prompt goes through; ``prefill`` (a ``Prefill``) is filled by
  stage 1, then by stage 2, and read by the counts;
- ``DECODE``: a step after a pruned prefill; ``step`` (a ``DecodeStep``) holds
  the masks the pruned layers get.

Every hook reads the phase before it touches anything, so one that fires outside
its phase (a plain forward of a sub-module, a decoding step) does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from tamp_modifier.token_pruning.decode_state import DecodeStep

__all__ = ["ForwardState", "Phase", "Prefill"]


class Phase(Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class Prefill:
    """What one prefill knows, from the multimodal pre-hook to its post-hook.

    ``L1`` is the length at the language model's input (after stage 1), ``L2`` the
    length layers ``layer`` and later see (after stage 2).
    """

    tokens: torch.Tensor  # [B] real tokens before stage 1
    visual: torch.Tensor  # [B] image tokens before stage 1
    valid: torch.Tensor  # [B, L1] real (non-padding) slots at the language model's input
    image: torch.Tensor  # [B, L1] image-token slots
    orig_len: int  # prompt length as given (padding included)
    mask1: torch.Tensor  # [B, L1] the 2-D attention mask handed to the language model
    columns: torch.Tensor | None = None  # [B, L1] input column of each slot (None: the identity)
    index2: torch.Tensor | None = None  # [B, L2] stage-2 survivors, positions in the L1 layout
    valid2: torch.Tensor | None = None  # [B, L2]
    pruned_mask: object = None  # the 4-D mask of the pruned layers (built once, by the first of them)
    image_features: list | None = None  # stage 1's projected features per image (the model's output)
    deepstack: list | None = None  # Qwen3-VL: per DeepStack layer, the features of the visual slots
    visual_mask: torch.Tensor | None = None  # [B, L1] the slots those features are added to

    @classmethod
    def of_prompt(cls, valid: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None) -> Prefill:
        """The prompt as given (nothing dropped yet): ``valid``/``image`` ``[B, L]``, ``mask`` its 2-D
        attention mask or None."""
        return cls(tokens=valid.sum(1), visual=(image & valid).sum(1), valid=valid, image=image,
                   orig_len=valid.shape[1], mask1=mask if mask is not None else valid.long())


@dataclass
class ForwardState:
    """The phase of the forward under way and its state (``prefill`` or ``step``, never both)."""

    phase: Phase = Phase.IDLE
    prefill: Prefill | None = None
    step: DecodeStep | None = None

    def start_prefill(self, prefill: Prefill) -> None:
        self.phase, self.prefill, self.step = Phase.PREFILL, prefill, None

    def start_decode(self, step: DecodeStep) -> None:
        self.phase, self.prefill, self.step = Phase.DECODE, None, step

    def end(self) -> None:
        self.phase, self.prefill, self.step = Phase.IDLE, None, None
