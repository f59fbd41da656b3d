"""Measure a sparsity pattern in weights, and how much of an intended one survived.

Pure functions on tensors. A pruning step records what it meant to leave (a
share of zeros per layer, or an N:M pattern); anything that runs after it
(quantization, GPTQ's weight updates, a save and reload) can be checked
against that record with these functions, without the mask itself.
"""

from __future__ import annotations

import torch

from tamp_modifier.pruning.wanda_rule import parse_mask_structure

__all__ = [
    "PATTERN_TOLERANCE", "compare_patterns", "describe_pattern", "layer_pattern", "nm_share", "pruned_share",
    "realized_sparsity",
]

# Unstructured pruners land a hair under their ratio (SparseGPT picks its mask
# over column blocks: within ~0.2%); a real break (GPTQ refilling zeros) is far
# larger. Half a percentage point separates the two.
PATTERN_TOLERANCE = 0.005


def nm_share(weight: torch.Tensor, n: int, m: int) -> float:
    """Share of groups of ``m`` consecutive weights along a row with at least ``n`` zeros.

    1.0 means the whole matrix is N:M sparse (what 2:4 kernels need). Rows whose
    length is not a multiple of ``m`` cannot be N:M: the share is then 0.0.

    >>> nm_share(torch.tensor([[0., 1., 0., 2.], [1., 2., 3., 0.]]), 2, 4)
    0.5
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        return 0.0
    zeros = (weight.reshape(weight.shape[0], -1, m) == 0).sum(dim=-1)
    return float((zeros >= n).float().mean().item())


def layer_pattern(weight: torch.Tensor, mask_structure: str = "0:0") -> dict:
    """``{"sparsity": share of exact zeros, "nm_share": ...}`` of one weight matrix.

    ``nm_share`` is only given for an N:M ``mask_structure`` (``None`` otherwise).
    """
    weight = weight.detach()
    if weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        weight = weight.float()  # fp8 and integer storage: zero compares exactly after the cast
    n, m = parse_mask_structure(mask_structure)
    return {
        "sparsity": float((weight == 0).sum().item() / weight.numel()),
        "nm_share": nm_share(weight, n, m) if m else None,
    }


def compare_patterns(
    expected: dict[str, dict],
    measured: dict[str, dict],
    tolerance: float = PATTERN_TOLERANCE,
) -> dict:
    """How much of an intended pattern the measured weights still have.

    :param expected: per layer ``{"sparsity": float | None, "mask_structure": str,
        "num_weights": int}``; ``sparsity`` is the share pruned (None for N:M,
        where ``n / m`` is implied)
    :param measured: per layer, ``layer_pattern`` of the weights now
    :return: ``{"intact": bool, "sparsity": {"expected", "measured"}`` (both
        parameter-weighted), ``"nm_share"`` (weighted over N:M layers, or None),
        ``"broken": [layer names]``, ``"layers": {name: {...}}}``. A layer is
        broken when its zeros fall more than ``tolerance`` below the intended
        share, or when any group no longer meets its N:M pattern.
    """
    missing = sorted(set(expected) - set(measured))
    if missing:
        raise KeyError(f"no measurement for layers {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    layers, broken = {}, []
    total = want = got = nm_weights = nm_sum = 0.0
    for name, spec in expected.items():
        n, m = parse_mask_structure(spec.get("mask_structure") or "0:0")
        target = n / m if m else float(spec["sparsity"])
        now = measured[name]
        size = float(spec["num_weights"])
        ok = now["sparsity"] >= target - tolerance
        if m:
            ok = ok and now["nm_share"] is not None and now["nm_share"] >= 1.0
            nm_weights += size
            nm_sum += size * (now["nm_share"] or 0.0)
        layers[name] = {"expected": target, "measured": now["sparsity"], "nm_share": now["nm_share"],
                        "intact": ok}
        if not ok:
            broken.append(name)
        total += size
        want += size * target
        got += size * now["sparsity"]
    return {
        "intact": not broken,
        "sparsity": {"expected": want / total if total else 0.0, "measured": got / total if total else 0.0},
        "nm_share": nm_sum / nm_weights if nm_weights else None,
        "broken": broken,
        "layers": layers,
    }


def describe_pattern(pattern: dict) -> str:
    """One line from ``compare_patterns``: how much of the pattern there is."""
    share = pattern["nm_share"]
    text = (f"{pattern['sparsity']['measured']:.2%} of weights are zero where "
            f"{pattern['sparsity']['expected']:.2%} were pruned")
    if share is not None:
        text += f", {share:.2%} of groups keep the N:M pattern"
    if not pattern["intact"]:
        text += f"; {len(pattern['broken'])} of {len(pattern['layers'])} layers are off"
    return text


def realized_sparsity(module: torch.nn.Module) -> float:
    """Fraction of exactly-zero entries in a module's weight."""
    weight = module.weight
    return float((weight == 0).sum().item() / weight.numel())


def pruned_share(modules) -> float:
    """Parameter-weighted share of exactly-zero weights over ``modules``."""
    modules = list(modules)
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    return zeros / sum(m.weight.numel() for m in modules)
