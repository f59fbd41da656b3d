"""Dropping tokens from a left-padded batch and re-padding it: the one sequence edit both stages make.

Stage 1 drops visual tokens before the language model, stage 2 drops tokens
after layer ``layer - 1``; both keep the survivors in order, left-padded to the
longest row (``repack``), and carry along what goes with each token: hidden
states and RoPE tables (``gather_tokens``), position ids, M-RoPE ones included
(``gather_positions``). Hence the name: what is done to the sequence, not how
it is laid out.

    >>> keep = torch.tensor([[True, False, True], [True, True, True]])
    >>> index, valid = repack(keep)
    >>> index.tolist(), valid.tolist()
    ([[0, 0, 2], [0, 1, 2]], [[False, True, True], [True, True, True]])
"""

from __future__ import annotations

import torch

__all__ = ["gather_positions", "gather_tokens", "repack"]


def repack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the kept positions in their original order, left-padded to the longest row.

    ``keep``: ``[B, L]`` bool. Returns ``index`` ``[B, L']`` (positions into the
    old layout; padding slots repeat the first kept position, or 0) and ``valid``
    ``[B, L']`` (False on padding), with ``L'`` the largest kept count.
    """
    b, n = keep.shape
    counts = keep.sum(1)
    width = int(counts.max()) if b else 0
    pos = torch.arange(n, device=keep.device).expand(b, n)
    # kept positions first, in order; dropped ones pushed past the end
    order = torch.where(keep, pos, pos + n).sort(1).values[:, :width]
    slot = torch.arange(width, device=keep.device).expand(b, width)
    pad = width - counts[:, None]
    valid = slot >= pad
    # row r's j-th kept token goes to slot pad_r + j
    src = (slot - pad).clamp_min(0)
    index = torch.gather(order, 1, src) if width else order
    index = torch.where(valid, index, index[:, :1] if width else index)
    return index % n if n else index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j], ...]`` for ``x`` of shape ``[B or 1, L, ...]`` and ``index`` ``[B, L']``."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    shape = (*index.shape, *([1] * (x.dim() - 2)))
    return torch.gather(x, 1, index.view(shape).expand(*index.shape, *x.shape[2:]))


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The position ids of the kept slots: ``[B, L]`` (or ``[1, L]``) as ``gather_tokens``; Qwen's
    M-RoPE ``[R, B, L]`` (R = 3 axes, or 4 with generate's text row first) gathered per row."""
    if position_ids.dim() == 2:
        return gather_tokens(position_ids, index)
    return torch.stack([gather_tokens(p, index) for p in position_ids])
