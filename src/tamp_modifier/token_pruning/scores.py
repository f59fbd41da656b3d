"""Token scores for the two pruning stages, as plain functions on tensors.

Stage 1 scores each patch of a vision encoder by its similarity to the CLS token:
``cls_attention`` (the default: the CLS query's softmax attention over the keys,
heads averaged) or ``cls_cosine`` (cosine of hidden states). Stage 2 scores each
token of the language model's sequence by the attention it receives from a set
of query tokens: ``received_attention``.

    >>> q = torch.randn(1, 5, 8); k = torch.randn(1, 5, 8)
    >>> cls_attention(q, k, num_heads=2, scale=0.5).shape   # 4 patches, CLS left out
    torch.Size([1, 4])
"""

from __future__ import annotations

import torch

__all__ = ["cls_attention", "cls_cosine", "received_attention"]


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """Attention of the CLS query (token 0) to every other token, heads averaged.

    ``queries`` and ``keys`` are the attention layer's projections ``[B, T, H*hd]``
    (before the head split). The softmax runs over all ``T`` keys, CLS included,
    as in the layer itself; the result ``[B, T-1]`` leaves the CLS column out.
    """
    b, t, width = keys.shape
    hd = width // num_heads
    q = queries[:, 0].float().view(b, num_heads, hd)
    k = keys.float().view(b, t, num_heads, hd)
    logits = torch.einsum("bhd,bthd->bht", q, k) * scale
    return logits.softmax(-1).mean(1)[:, 1:]


def cls_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, T-1]`` of each token's hidden state ``[B, T, D]`` to token 0 (CLS)."""
    h = torch.nn.functional.normalize(hidden.float(), dim=-1)
    return (h[:, 1:] * h[:, :1]).sum(-1)


def received_attention(attention: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Mean attention each key receives from the query tokens that can see it.

    ``attention``: ``[B, L, L]`` (query, key) probabilities, heads already
    averaged; ``queries``: ``[B, L]`` bool, the rows to average. Under a causal
    mask query ``q`` sees key ``j`` only if ``q >= j``; averaging over those
    queries alone keeps late tokens from being penalised for having fewer
    viewers. A key no query sees scores 0. Returns ``[B, L]``.
    """
    b, n, _ = attention.shape
    idx = torch.arange(n, device=attention.device)
    sees = queries[:, :, None] & (idx[:, None] >= idx[None, :])[None]  # [B, q, j]
    weights = sees.to(attention.dtype)
    total = (attention * weights).sum(1)
    return total / weights.sum(1).clamp_min(1)
