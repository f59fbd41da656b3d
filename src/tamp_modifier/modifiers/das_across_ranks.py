"""DiversityAwareSparsity's totals over the ranks of a torchrun run (no-ops in one process).

Each rank scores its own share of the calibration samples; the scores are made
from the sums of all of them, so every rank scores, allocates and reports alike.
"""

from __future__ import annotations

import torch

from tamp_modifier.modifiers.distributed import is_distributed, sum_across_ranks
from tamp_modifier.modifiers.token_labels import CalibrationTokenLabels
from tamp_modifier.pruning.diversity import DiversityAccumulator

__all__ = ["samples_across_ranks", "sum_accumulators_across_ranks", "tokens_across_ranks"]


def tokens_across_ranks(labels: CalibrationTokenLabels, modalities: list[str]) -> dict[str, int]:
    """Tokens per modality over all ranks' samples."""
    local = torch.tensor(labels.counts(len(modalities)), dtype=torch.long)
    return dict(zip(modalities, sum_across_ranks([local])[0].tolist()))


def samples_across_ranks(labels: CalibrationTokenLabels) -> int:
    """Samples scored, over all ranks."""
    return int(sum_across_ranks([torch.tensor(len(labels))])[0])


def sum_accumulators_across_ranks(accumulators: list[DiversityAccumulator], num_terms: int) -> None:
    """Sum every accumulator's term sums and counts over the ranks, in place.

    ``accumulators`` must be in one order on every rank (the model's). A rank
    no sample of which reached a layer adds zeros. The sums are float64 totals
    of float32 per-sample terms, so they do not depend on which rank saw which
    sample, nor in what order, beyond about 1e-16 relative: the scores equal a
    single-process run's on the same samples.
    """
    if not is_distributed():
        return
    zeros = torch.zeros(num_terms, dtype=torch.float64)
    sums = [a.sums if a.sums is not None else zeros for a in accumulators]
    counts = [a.counts if a.counts is not None else zeros.long() for a in accumulators]
    reduced = sum_across_ranks(sums + counts)
    for i, acc in enumerate(accumulators):
        acc.sums, acc.counts = reduced[i], reduced[len(accumulators) + i]
