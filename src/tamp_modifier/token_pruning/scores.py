"""Token scores for the two pruning stages, as plain functions on tensors.

Stage 1 scores each patch of a vision encoder by its similarity to the CLS token:
``cls_attention`` (the default: the CLS query's softmax attention over the keys,
heads averaged) or ``cls_cosine`` (cosine of hidden states). Towers without a CLS
token (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) replace the CLS query by every query of
the same image: ``patch_attention_received`` (the mean attention a patch receives,
heads averaged), or the CLS state by the image's mean feature: ``mean_cosine``;
``group_mean`` turns per-patch scores into per-merged-token ones. Stage 2 scores
each token of the language model's sequence by the attention it receives from a
set of query tokens: ``received_attention``.

    >>> q = torch.randn(1, 5, 8); k = torch.randn(1, 5, 8)
    >>> cls_attention(q, k, num_heads=2, scale=0.5).shape   # 4 patches, CLS left out
    torch.Size([1, 4])
"""

from __future__ import annotations

import torch

__all__ = ["cls_attention", "cls_cosine", "group_mean", "mean_cosine", "patch_attention_received",
           "received_attention"]


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


def patch_attention_received(
    queries: torch.Tensor, keys: torch.Tensor, bounds: list[int], scale: float, chunk: int = 1024
) -> torch.Tensor:
    """Mean softmax attention each patch receives from the queries of its own segment, heads averaged.

    ``queries``/``keys``: ``[T, H, hd]`` (after the layer's rotary embedding), the
    patches of several images packed one after another; ``bounds``: the segment
    boundaries ``[0, t_1, ..., T]`` (the layer's ``cu_seqlens``), attention never
    crossing them, as in the tower. The attention is bidirectional, so every query
    of a segment sees every key of it; a segment's scores sum to 1. Returns ``[T]``
    (float32). Queries are taken ``chunk`` at a time so the ``T x T`` matrix of a
    large image never exists at once.
    """
    out = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
    heads = keys.shape[1]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        k = keys[lo:hi].float().transpose(0, 1)  # [H, n, hd]
        total = torch.zeros(hi - lo, dtype=torch.float32, device=keys.device)
        for start in range(lo, hi, chunk):
            q = queries[start:min(start + chunk, hi)].float().transpose(0, 1)  # [H, c, hd]
            total += ((q @ k.transpose(1, 2)) * scale).softmax(-1).sum((0, 1))
        out[lo:hi] = total / (heads * (hi - lo))
    return out


def mean_cosine(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[n]`` of each row of ``features`` ``[n, D]`` to the rows' mean."""
    f = features.float()
    return torch.nn.functional.cosine_similarity(f, f.mean(0, keepdim=True), dim=-1)


def group_mean(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Mean of each run of ``group`` consecutive scores: ``[T] -> [T / group]`` (a merged token's patches)."""
    if scores.numel() % group:
        raise ValueError(f"{scores.numel()} patch scores do not split into groups of {group}")
    return scores.view(-1, group).mean(1)
