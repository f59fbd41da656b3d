"""How diverse a layer's output tokens are, within and across modalities.

TAMP's Diversity-Aware Sparsity scores a layer by the mean cosine distance
``d_ij = 1 - <z_i, z_j>`` between its unit-normalised output tokens ``z_i``:
inside each modality (``s_m``, pairs ``i != j``) and between every pair of
modalities (``s_mm'``). Both are exact in linear time from per-modality sums
``S_m = sum_i z_i`` and ``Q_m = sum_i ||z_i||^2``::

    s_m   = 1 - (||S_m||^2 - Q_m) / (n_m (n_m - 1))
    s_mm' = 1 - <S_m, S_m'> / (n_m n_m')

``Q_m`` equals ``n_m`` except for all-zero output rows, which stay zero vectors
after normalisation (``torch.nn.functional.normalize``'s convention); using
``Q_m`` keeps the formula exact for them too. No N x N matrix is formed.

Labels are integers: ``0`` is text, ``k > 0`` the k-th non-text modality, and
negative labels (padding) are no token at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DiversityAccumulator", "modality_diversity", "term_names"]


def term_names(modalities: Sequence[str]) -> list[tuple[str, str]]:
    """Names of the diversity terms for these modalities, in accumulator order.

    Intra-modality terms come first as ``(m, m)``, then every unordered pair
    ``(a, b)`` with ``a`` before ``b`` in ``modalities``.
    """
    intra = [(m, m) for m in modalities]
    inter = [
        (modalities[a], modalities[b])
        for a in range(len(modalities))
        for b in range(a + 1, len(modalities))
    ]
    return intra + inter


def _pair_index(num_modalities: int) -> tuple[torch.Tensor, torch.Tensor]:
    upper = torch.triu_indices(num_modalities, num_modalities, offset=1)
    return upper[0], upper[1]


def _modality_sums(
    outputs: torch.Tensor, labels: torch.Tensor, num_modalities: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample and modality: ``S_m`` ``[B, M, d]``, ``Q_m`` and ``n_m`` ``[B, M]``.

    ``outputs`` is ``[B, L, d]``, ``labels`` ``[B, L]``; float32 whatever the
    model's dtype. A one-hot matmul, not ``index_add_``: on CPU that loops over
    the tokens one row at a time.
    """
    z = F.normalize(outputs.float(), dim=-1)
    present = (labels >= 0).unsqueeze(-1)
    onehot = F.one_hot(labels.clamp(min=0).long(), num_modalities).to(z.dtype) * present  # [B, L, M]
    sums = onehot.transpose(1, 2) @ z
    sq_norms = (onehot * z.square().sum(-1, keepdim=True)).sum(1)
    return sums, sq_norms, onehot.sum(1)


def _terms_from_sums(sums, sq_norms, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample terms ``[B, T]`` and their defined-mask, from per-modality sums."""
    gram = sums @ sums.transpose(1, 2)  # <S_a, S_b>
    diag = gram.diagonal(dim1=1, dim2=2)
    intra = 1 - (diag - sq_norms) / (counts * (counts - 1)).clamp(min=1)
    a, b = _pair_index(counts.shape[1])
    cross = counts[:, a] * counts[:, b]
    inter = 1 - gram[:, a, b] / cross.clamp(min=1)
    return torch.cat([intra, inter], 1), torch.cat([counts >= 2, cross > 0], 1)


class DiversityAccumulator:
    """Streams the diversity terms of one layer over calibration samples.

    Each term is averaged over the samples in which it is defined; the layer
    score is the mean of the defined terms (TAMP: ``(s_v + s_l + s_vl) / 3``).
    Only two small running sums are kept (on the outputs' device, so a GPU run
    never syncs per sample): keeping per-sample sums for later instead leaves
    thousands of tiny tensors between the large activations, and fragmentation
    then raised the process's peak memory by ~15% on CPU.

    :param modalities: names, index = label (``modalities[0]`` is text)
    """

    def __init__(self, modalities: Sequence[str]):
        self.modalities = list(modalities)
        self.names = term_names(self.modalities)
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``outputs`` ``[B, L, d]`` (or ``[L, d]``), ``labels`` alike."""
        if outputs.dim() == 2:
            outputs, labels = outputs.unsqueeze(0), labels.unsqueeze(0)
        sums = _modality_sums(outputs, labels.to(outputs.device), len(self.modalities))
        terms, defined = _terms_from_sums(*sums)
        terms = torch.where(defined, terms, 0.0).double().sum(0)
        if self.sums is None:
            self.sums, self.counts = terms, defined.sum(0)
        else:
            self.sums += terms
            self.counts += defined.sum(0)

    def terms(self) -> dict[tuple[str, str], float]:
        """Each defined term, averaged over the samples that define it."""
        if self.sums is None:
            return {}
        sums, counts = self.sums.cpu().tolist(), self.counts.cpu().tolist()
        return {name: s / c for name, s, c in zip(self.names, sums, counts) if c > 0}

    def score(self) -> float:
        """Mean of the defined terms; NaN when no term is defined."""
        terms = self.terms()
        return sum(terms.values()) / len(terms) if terms else math.nan


def modality_diversity(
    outputs: torch.Tensor,
    labels: torch.Tensor,
    modalities: Sequence[str] | None = None,
) -> dict:
    """Diversity terms and layer score of one sample's layer outputs.

    :param outputs: ``[N, d]`` output tokens of one layer for one sample
    :param labels: ``[N]`` integer modality per token; 0 = text, k = the k-th
        other modality, negative = padding (ignored)
    :param modalities: names per label; default ``text``, ``modality1``, ...
    :return: ``{"intra": {m: s_m}, "inter": {(a, b): s_ab}, "score": s}`` with
        only the terms defined for this sample (``s_m`` needs two tokens of
        ``m``); ``score`` is their mean, NaN if none is defined.

    Example::

        >>> out = torch.randn(10, 8); lab = torch.tensor([0] * 4 + [1] * 6)
        >>> modality_diversity(out, lab, ["text", "image"])["score"]
    """
    if outputs.dim() != 2 or labels.shape != outputs.shape[:1]:
        raise ValueError(
            f"modality_diversity takes one sample: outputs [N, d] and labels [N]; "
            f"got {tuple(outputs.shape)} and {tuple(labels.shape)}"
        )
    if modalities is None:
        top = int(labels.max().item()) if labels.numel() else 0
        modalities = ["text"] + [f"modality{k}" for k in range(1, max(top, 0) + 1)]
    acc = DiversityAccumulator(modalities)
    acc.update(outputs, labels)
    terms = acc.terms()
    return {
        "intra": {a: v for (a, b), v in terms.items() if a == b},
        "inter": {(a, b): v for (a, b), v in terms.items() if a != b},
        "score": acc.score(),
    }
