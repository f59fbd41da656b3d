"""AMIA's per-sample loop for one Linear: choose tokens, hand their weighted rows on, count them.

For each calibration sample (one row of a batch) the Linear's real tokens (padding
dropped) are chosen by ``token_selection``:

- ``amia``: ``select_tokens`` in the Linear's output space, from the block's attention;
- ``attention``: the tokens attended above uniform (``attention_tokens``);
- ``random``: ``random_tokens`` distinct tokens, seeded per layer and sample
  (``random_selection_seed``);
- ``all``: every real token (plain Wanda / SparseGPT).

The chosen tokens' input rows, weighted by ``token_weighting``, go to the Linear's
statistic (a callable: what the statistic is, and where it lives, is the caller's
business), and the tokens selected and seen are counted per modality for the report.
As ``DiversityAccumulator`` is for DAS, this is plain code on tensors.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tamp_modifier.pruning.token_selection import attention_tokens, random_tokens, select_tokens
from tamp_modifier.pruning.token_weighting import weighted_rows
from tamp_modifier.validation import one_of

__all__ = ["TOKEN_SELECTIONS", "SelectionAccumulator", "TokenChoice", "last_query_attention",
           "random_selection_seed"]

TOKEN_SELECTIONS = ("amia", "attention", "random", "all")


def last_query_attention(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's last real token's attention to every token, averaged over heads.

    :param weights: ``[B, heads, L, L]`` a block's attention weights
    :param labels: ``[B, L]`` modality per token, negative for padding (on the CPU, as recorded)
    :return: ``[B, L]`` float32, on ``weights``' device
    """
    positions = torch.arange(labels.shape[1]).expand_as(labels)
    last = torch.where(labels >= 0, positions, -1).amax(1).to(weights.device)
    rows = weights[torch.arange(weights.shape[0], device=weights.device), :, last]
    return rows.float().mean(1).detach()


def random_selection_seed(seed: int, layer: str, sample_fingerprint: int) -> int:
    """The generator seed of ``random`` for one layer and sample.

    From the layer's name and the sample's input ids (``sample_fingerprint``, a
    checksum of them), never from a position: the same seed, sample and layer give
    the same tokens in any process and data order (so also under torchrun).
    """
    layer_code = zlib.crc32(layer.encode())
    return (seed * 1_000_003 + sample_fingerprint * 7_919 + layer_code) % 2**63


@dataclass(frozen=True)
class TokenChoice:
    """Which of one sample's tokens a Linear's statistic is built from (``token_selection``).

    ``knn``, ``gamma``, ``penalty_gamma`` and ``mmd_scale`` are ``select_tokens``'s;
    ``random_tokens`` is the count for ``random``.
    """

    selection: str = "amia"
    knn: int = 3
    gamma: float = 1.0
    penalty_gamma: float = 0.2
    mmd_scale: float = 0.1
    random_tokens: int = 100

    def __post_init__(self) -> None:
        one_of("token_selection", self.selection, TOKEN_SELECTIONS)

    @property
    def needs_attention(self) -> bool:
        return self.selection in ("amia", "attention")

    def __call__(self, outputs: torch.Tensor, attention: torch.Tensor | None, labels: torch.Tensor,
                 seed: int | None = None) -> torch.Tensor:
        """Indices of the chosen tokens among one sample's ``N`` real tokens.

        :param outputs: ``[N, d]`` the Linear's outputs
        :param attention: ``[N]`` the last real query's attention, for ``amia`` and ``attention``
        :param labels: ``[N]`` modality per token
        :param seed: the generator seed, for ``random`` (``random_selection_seed``)
        """
        n = outputs.shape[0]
        if self.selection == "all":
            return torch.arange(n, device=outputs.device)
        if self.selection == "random":
            generator = torch.Generator().manual_seed(seed)
            return random_tokens(n, self.random_tokens, generator).to(outputs.device)
        if self.selection == "attention":
            return attention_tokens(attention)
        return select_tokens(outputs, attention, labels, knn=self.knn, gamma=self.gamma,
                             penalty_gamma=self.penalty_gamma, mmd_scale=self.mmd_scale)


class SelectionAccumulator:
    """Streams one Linear's calibration samples: their chosen tokens' rows, and counts per modality.

    :param num_modalities: labels ``0..num_modalities-1`` are counted (0 is text)
    :param choice: which tokens are chosen
    :param weighting, selected_weight: ``weighted_rows``'s
    """

    def __init__(self, num_modalities: int, choice: TokenChoice, weighting: str = "selected",
                 selected_weight: float = 1.0):
        self.num_modalities = num_modalities
        self.choice, self.weighting, self.selected_weight = choice, weighting, selected_weight
        self.selected = torch.zeros(num_modalities, dtype=torch.long)  # tokens chosen, per modality
        self.seen = torch.zeros(num_modalities, dtype=torch.long)  # real tokens, per modality

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor,
               attention: torch.Tensor | None, add_rows: Callable[[torch.Tensor, float], None],
               seeds: Sequence[int] | None = None) -> None:
        """Add a batch, sample by sample.

        :param inputs, outputs: the Linear's ``[B, L, columns]`` and ``[B, L, rows]`` (or without ``B``)
        :param labels: ``[B, L]`` modality per token, negative for padding (or ``[L]``)
        :param attention: ``[B, L]`` the last real query's attention per sample, when the choice needs it
        :param add_rows: called once per sample with the weighted rows ``sqrt(w_t) x_t``
            and ``sum_t w_t`` (the statistic's ``add``)
        :param seeds: per sample, the seed of ``random`` (``random_selection_seed``)
        """
        if inputs.dim() == 2:
            inputs, outputs = inputs.unsqueeze(0), outputs.unsqueeze(0)
        labels = labels.reshape(inputs.shape[:-1]).to(inputs.device)
        m = self.num_modalities
        for b in range(inputs.shape[0]):
            real = (labels[b] >= 0).nonzero().flatten()
            padded = len(real) < labels.shape[1]  # else skip copying the real tokens out
            out, lab = (outputs[b, real], labels[b, real]) if padded else (outputs[b], labels[b])
            sample_attention = attention[b, real] if self.choice.needs_attention else None
            chosen = self.choice(out, sample_attention, lab, seeds[b] if seeds is not None else None)
            x = inputs[b, real] if padded else inputs[b]
            rows = weighted_rows(x, chosen, self.weighting, self.selected_weight)
            token_weight = (len(chosen) if self.weighting == "selected"  # sum_t w_t
                            else len(real) + (self.selected_weight - 1) * len(chosen))
            add_rows(rows, token_weight)
            if padded:
                chosen = real[chosen]
            self.selected += torch.bincount(labels[b, chosen].long().cpu(), minlength=m)[:m]
            self.seen += torch.bincount(lab.long().cpu(), minlength=m)[:m]
