"""How closely a pruned model follows the dense one at the answer, beyond accuracy.

Accuracy moves only when an answer flips; these move with every change of the
next-token distribution at the answer position, so they separate methods whose
accuracies tie. Per question, over the whole vocabulary (natural logarithms):

- ``kl``: KL(dense || pruned) = sum_v p_dense(v) (log p_dense(v) - log p_pruned(v));
- ``nll``: the pruned model's negative log-likelihood of the right answer
  (``nll_dense``: the dense model's, for scale);
- ``agreement``: whether the pruned model's greedy answer is the dense one's.

Each is averaged per task family and over all questions (``"overall"``).
Every demo answer is one token, so the answer position is the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fidelity"]


def fidelity(
    dense_log_probs: torch.Tensor,
    pruned_log_probs: torch.Tensor,
    answer_ids: Sequence[int] | torch.Tensor,
    families: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Mean KL, NLL and agreement per family and overall.

    :param dense_log_probs: ``[Q, V]`` log-softmax of the dense model at each answer position
    :param pruned_log_probs: ``[Q, V]`` the same for the pruned model
    :param answer_ids: ``[Q]`` the right answer's token id
    :param families: ``[Q]`` each question's task family
    :return: ``{family: {"kl", "nll", "nll_dense", "agreement", "questions"}, ..., "overall": {...}}``
    """
    dense, pruned = dense_log_probs.double(), pruned_log_probs.double()
    if dense.shape != pruned.shape or dense.dim() != 2 or len(families) != dense.shape[0]:
        raise ValueError(f"need [Q, V] log-probabilities of equal shape and Q families; got "
                         f"{tuple(dense.shape)}, {tuple(pruned.shape)} and {len(families)}")
    answers = torch.as_tensor(answer_ids, dtype=torch.long)
    p = dense.exp()
    # Tokens the dense model gives probability 0 add nothing (0 log 0 = 0).
    kl = torch.where(p > 0, p * (dense - pruned), torch.zeros_like(p)).sum(1)
    rows = torch.arange(len(answers))
    per_question = {
        "kl": kl,
        "nll": -pruned[rows, answers],
        "nll_dense": -dense[rows, answers],
        "agreement": (dense.argmax(1) == pruned.argmax(1)).double(),
    }
    groups = {f: [i for i, g in enumerate(families) if g == f] for f in dict.fromkeys(families)}
    groups["overall"] = list(range(len(families)))
    return {
        name: {**{k: float(v[idx].mean()) for k, v in per_question.items()}, "questions": len(idx)}
        for name, idx in groups.items()
    }
