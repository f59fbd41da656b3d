"""Which tokens count in a layer's activation norm (TAMP's AMIA selection).

For one sample and one Linear, in the Linear's output space (unit-normalised
outputs ``z``, distances ``d_ij = 1 - <z_i, z_j>``, kernel ``K = exp(-gamma d)``):

1. each token's ``knn`` nearest other tokens by ``d``;
2. attention propagated once to neighbours:
   ``g_i = a_i + sum_{j in kNN(i)} K_ij a_j``;
3. greedy: take the unselected token with the largest ``g``; lower its
   neighbours' ``g`` by ``exp(-penalty_gamma d_ij) * max(g_i, 0)``; stop when
   the selected set C' represents all tokens C well enough:
   ``MMD(C, C') < mmd_scale * sqrt(s)``, with ``s`` this sample's diversity of
   the outputs and ``MMD = A(C,C) + A(C',C') - 2 A(C,C')``, ``A`` the mean of
   ``K`` over the pairs (diagonals included).

After the N x N kernel, the loop costs O(|C'| N): ``A(C, C')`` and
``A(C', C')`` come from running sums, never recomputed over C' x C'.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["attention_tokens", "random_tokens", "select_tokens"]


def _sample_diversity(z: torch.Tensor, similarity: torch.Tensor, labels: torch.Tensor) -> float:
    """The sample's DAS score (mean of defined intra/inter terms), ``z`` unit rows.

    Same formulas as ``tamp_modifier.pruning.diversity``: ``S_a`` sums modality ``a``'s
    rows of ``z``, ``Q_a`` their squared norms (the diagonal of ``z z^T``). The
    handful of terms is done in Python floats: this runs once per sample and
    Linear, where a dozen tiny tensor ops would cost more than the matmuls.
    """
    onehot = F.one_hot(labels.long(), int(labels.max()) + 1).to(z.dtype)  # [N, M]
    sums = onehot.T @ z  # S_a
    block = (sums @ sums.T).tolist()  # <S_a, S_b>
    sq_norms = (onehot.T @ similarity.diagonal()).tolist()
    counts = onehot.sum(0).tolist()
    m = len(counts)
    terms = [
        1 - (block[a][a] - sq_norms[a]) / (counts[a] * (counts[a] - 1)) for a in range(m) if counts[a] >= 2
    ]
    terms += [
        1 - block[a][b] / (counts[a] * counts[b])
        for a in range(m) for b in range(a + 1, m) if counts[a] * counts[b] > 0
    ]
    return sum(terms) / len(terms) if terms else math.nan


def _kernel_and_neighbours(outputs: torch.Tensor, labels: torch.Tensor, knn: int, gamma: float):
    """Kernel ``K = exp(-gamma d)``, each token's ``knn`` nearest others, their
    ``d``, and the sample's diversity ``s``."""
    z = F.normalize(outputs.float(), dim=-1)
    similarity = z @ z.T  # d = 1 - similarity
    kernel = torch.exp(similarity * gamma - gamma)
    diversity = _sample_diversity(z, similarity, labels)
    n = similarity.shape[0]
    k = min(knn, n - 1)
    if k == 0:
        return kernel, None, None, diversity
    similarity.fill_diagonal_(-math.inf)  # a token is not its own neighbour
    # Ties at the k-th place (identical tokens) go to the lowest index, so the
    # selection is reproducible; topk leaves that open, so rows with such a tie
    # take a stable sort (rare: the sort costs ~10x topk).
    values, neighbours = torch.topk(similarity, min(k + 1, n - 1), dim=1)
    neighbours = neighbours[:, :k]
    if k < n - 1:
        tied = (values[:, k - 1] == values[:, k]).nonzero().flatten()
        if tied.numel():
            order = torch.sort(similarity[tied], dim=1, descending=True, stable=True).indices
            neighbours[tied] = order[:, :k]
    return kernel, neighbours, 1 - similarity.gather(1, neighbours), diversity


def select_tokens(
    outputs: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    *,
    knn: int = 3,
    gamma: float = 1.0,
    penalty_gamma: float = 0.2,
    mmd_scale: float = 0.1,
) -> torch.Tensor:
    """Indices of the tokens AMIA selects for one sample, in selection order.

    :param outputs: ``[N, d]`` the Linear's output tokens (padding removed)
    :param attention: ``[N]`` attention of the last query to each token,
        averaged over heads
    :param labels: ``[N]`` modality per token (0 text, k the k-th other
        modality); used for the sample's diversity ``s``
    :return: ``LongTensor`` of selected indices; at least one. Ties (in ``g``,
        and among equally near neighbours) go to the lowest index. The loop
        also ends when ``s`` is undefined, non-finite or ``<= 0`` (all tokens
        alike), or when every token is selected.

    Example::

        >>> idx = select_tokens(out, attn, labels)   # e.g. tensor([17, 3, 40])
    """
    n = outputs.shape[0]
    if n == 0:
        raise ValueError("select_tokens needs at least one token")
    if attention.shape != (n,) or labels.shape != (n,):
        raise ValueError(
            f"outputs [N, d], attention [N] and labels [N] must agree; got "
            f"{tuple(outputs.shape)}, {tuple(attention.shape)}, {tuple(labels.shape)}"
        )
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=outputs.device)

    kernel, neighbours, near, s = _kernel_and_neighbours(outputs, labels, knn, gamma)
    # s <= 0 means every token is alike (threshold 0): one token represents them
    # all, and waiting for MMD < 0 would select everything on rounding noise.
    threshold = mmd_scale * math.sqrt(s) if math.isfinite(s) and s > 0 else None

    row_sums = kernel.sum(1)
    a_cc = row_sums.sum().item() / (n * n)
    # The rest is short, sequential, and on vectors of N (or N x knn): on NumPy an
    # op costs ~1-3 us where a torch op costs ~10 us, and on a GPU each greedy
    # step would sync anyway. So those vectors go to the host once, and kernel
    # rows are read as the loop needs them.
    g = attention.float().cpu().numpy()
    if neighbours is not None:
        neighbours, near = neighbours.cpu().numpy(), near.cpu().numpy()
        g = g + (np.exp(-gamma * near) * g[neighbours]).sum(1)
        penalty = np.exp(-penalty_gamma * near)
    else:
        g = g.copy()
    row_sums, self_kernel = row_sums.cpu().numpy(), kernel.diagonal().cpu().numpy()
    on_host = kernel.device.type == "cpu"
    kernel_rows = kernel.numpy() if on_host else kernel
    to_selected = np.zeros(n, dtype=np.float32)  # sum_{j in C'} K_ij
    sum_cc_sel = 0.0  # sum over C x C' of K
    sum_sel_sel = 0.0  # sum over C' x C' of K
    order = []
    while True:
        i = int(g.argmax())
        lift = max(float(g[i]), 0.0)
        g[i] = -np.inf  # taken: never the argmax again (penalties keep it -inf)
        order.append(i)
        # K is symmetric: the new pairs with C' are to_selected[i] twice, plus K_ii.
        sum_sel_sel += 2 * float(to_selected[i]) + float(self_kernel[i])
        to_selected += kernel_rows[i] if on_host else kernel_rows[i].cpu().numpy()
        sum_cc_sel += float(row_sums[i])
        if neighbours is not None:
            g[neighbours[i]] -= penalty[i] * np.float32(lift)
        m = len(order)
        mmd = a_cc + sum_sel_sel / (m * m) - 2 * sum_cc_sel / (n * m)
        if threshold is None or m == n or mmd < threshold:
            break
    return torch.tensor(order, dtype=torch.long, device=outputs.device)


def attention_tokens(attention: torch.Tensor) -> torch.Tensor:
    """Ablation ``attention``: the tokens attended above uniform (``a_i > 1/N``)."""
    picked = (attention.float() > 1.0 / attention.numel()).nonzero().flatten()
    # Attention sums to 1 over N tokens, so some token is at least 1/N; if all are
    # exactly uniform, none is strictly above: keep the most attended one.
    return picked if picked.numel() else attention.argmax().reshape(1)


def random_tokens(n: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Ablation ``random``: ``count`` distinct tokens (all if fewer), seeded."""
    return torch.randperm(n, generator=generator)[: min(count, n)]
