"""Two pruning baselines: magnitude pruning and OWL layerwise sparsities.

**Magnitude** is Wanda's per-row rule with every activation norm equal to 1:
each output row loses its smallest ``|W|``.

**OWL** (Outlier Weighed Layerwise sparsity, Yin et al. 2024) gives each
decoder block its own sparsity from its share of outlier weights. With Wanda's
score ``|W_rk| * ||X_k||`` measured on the dense model, a block's outliers are
the scores above ``m`` times the mean score over all the block's weights, and
its ratio ``D`` is outliers over weights. Then::

    t     = 2 * lam * (D - min D) / (max D - min D)      (0 when all D are equal)
    keep  = t - mean(t) + (1 - sparsity)
    block sparsity = 1 - keep

A block with MORE outliers keeps MORE weights, i.e. gets LESS sparsity. The
block sparsities average to ``sparsity`` and lie ``2 * lam`` apart at most.
``owl_sparsity_list`` turns them into the per-module ``sparsity`` list that
llm-compressor's ``WandaPruningModifier`` / ``SparseGPTModifier`` accept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from compressed_tensors.utils import match_named_modules

from tamp_modifier.modifiers.ratio_handover import pruned_by_targets
from tamp_modifier.pruning.wanda_rule import parse_mask_structure, prune_mask
from tamp_modifier.text_decoder import TOWER_IGNORE
from tamp_modifier.validation import as_list, in_range

__all__ = [
    "magnitude_prune",
    "input_channel_norms",
    "outlier_ratios",
    "owl_sparsities",
    "owl_sparsity_list",
]

# Value given to a pruner target whose modules are all ignored: the pruner
# never reads it (it registers no hook there), 0.0 says "left dense".
_UNUSED = 0.0


def _matched_linears(model, targets, ignore) -> dict[str, torch.nn.Linear]:
    """Modules matched by targets minus ignore; all must be Linear, at least one."""
    targets, ignore = as_list(targets) or [], as_list(ignore) or []
    matched = dict(match_named_modules(model, targets, ignore))
    if not matched:
        raise ValueError(
            f"targets={targets} with ignore={ignore} match no module of {type(model).__name__}; "
            'use class names such as "Linear" or "re:" name patterns'
        )
    others = [f"{n} ({type(m).__name__})" for n, m in matched.items() if not isinstance(m, torch.nn.Linear)]
    if others:
        raise ValueError(f"targets must match Linear modules only; they also match {others[:3]}")
    return matched


def magnitude_prune(
    model: torch.nn.Module,
    sparsity: float,
    *,
    mask_structure: str = "0:0",
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = TOWER_IGNORE,
) -> dict[str, float]:
    """Zero the smallest ``|W|`` of every output row of the matched Linears, in place.

    Unstructured (``"0:0"``) prunes ``round(columns * sparsity)`` weights per
    row; ``"N:M"`` prunes the N smallest of every M consecutive inputs of a row.
    Returns the realized sparsity (share of exact zeros) per module name.
    """
    in_range("sparsity", sparsity, 0, 1)
    prune_n, prune_m = parse_mask_structure(mask_structure)
    realized = {}
    for name, module in _matched_linears(model, targets, ignore).items():
        weight = module.weight
        ones = torch.ones(weight.shape[1], device=weight.device)
        with torch.no_grad():
            weight.masked_fill_(prune_mask(weight, ones, sparsity, prune_n, prune_m), 0)
        realized[name] = int((weight == 0).sum()) / weight.numel()
    return realized


def input_channel_norms(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = TOWER_IGNORE,
) -> dict[str, torch.Tensor]:
    """Per input channel ``sqrt(mean over tokens of x^2)`` of each matched Linear's input.

    Runs the model as it is (dense) on each batch of model inputs. Where a batch
    has an ``attention_mask`` of the same ``[batch, sequence]`` shape as a
    module's input, only tokens with mask 1 count; otherwise all tokens do.
    """
    modules = _matched_linears(model, targets, ignore)
    sums = {
        n: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for n, m in modules.items()
    }
    counts = dict.fromkeys(modules, 0)
    current = {"mask": None}

    def accumulate(name):
        def hook(_module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().float()
            mask = current["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device) == 1]
            x = x.reshape(-1, x.shape[-1])
            sums[name] += x.pow(2).sum(dim=0)
            counts[name] += x.shape[0]

        return hook

    device = next(model.parameters()).device
    hooks = [m.register_forward_pre_hook(accumulate(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                current["mask"] = batch.get("attention_mask")
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    unseen = [n for n, c in counts.items() if c == 0]
    if unseen:
        raise ValueError(f"{len(unseen)} modules saw no unmasked token, e.g. {unseen[:3]}; give more batches")
    return {n: (sums[n] / counts[n]).sqrt() for n in modules}


def outlier_ratios(
    model: torch.nn.Module, norms: Mapping[str, torch.Tensor], blocks: Iterable[str], m: float = 5.0
) -> dict[str, float]:
    """OWL's outlier ratio ``D`` of each block (its "layerwise outlier distribution").

    Over the modules in ``norms`` whose name starts with ``block + "."``: the
    score is ``|W| * norm`` (norm per input channel); the block's outliers are
    the scores above ``m`` times the mean score over ALL the block's weights
    (one threshold per block, as in OWL, where a "layer" is a decoder block);
    ``D`` = outliers / weights.
    """
    ratios = {}
    for block in blocks:
        names = [n for n in norms if n.startswith(block + ".")]
        if not names:
            raise ValueError(f"no module in norms lies in block {block!r}")
        scores = []
        for name in names:
            weight = model.get_submodule(name).weight.detach().float()
            scores.append((weight.abs() * norms[name].to(weight.device).float().reshape(1, -1)).flatten())
        score = torch.cat(scores)
        ratios[block] = int((score > m * score.mean()).sum()) / score.numel()
    return ratios


def owl_sparsities(ratios: Mapping[str, float], sparsity: float, lam: float = 0.08) -> dict[str, float]:
    """Block sparsities from outlier ratios: more outliers, less sparsity; mean = ``sparsity``."""
    if not ratios:
        raise ValueError("no outlier ratios given")
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (a negative lam inverts OWL's sign), got {lam}")
    low, high = min(ratios.values()), max(ratios.values())
    t = {b: 2 * lam * (d - low) / (high - low) if high > low else 0.0 for b, d in ratios.items()}
    mean_t = sum(t.values()) / len(t)
    result = {b: 1 - (t[b] - mean_t + (1 - sparsity)) for b in ratios}
    bad = {b: s for b, s in result.items() if not 0.0 <= s < 1.0}
    if bad:
        raise ValueError(
            f"OWL sparsities outside [0, 1) for sparsity={sparsity}, lam={lam}: {bad}; lower lam"
        )
    return result


def owl_sparsity_list(
    model: torch.nn.Module,
    block_sparsity: Mapping[str, float],
    *,
    targets: Iterable[str] = ("Linear",),
    ignore: Iterable[str] = TOWER_IGNORE,
) -> list[float]:
    """The per-target ``sparsity`` list for ``WandaPruningModifier(targets=..., ignore=...)``.

    llm-compressor zips that list with ``match_named_modules(model, targets)``
    WITHOUT ``ignore`` and checks its length against them, so every target gets
    a value: its pruned modules' block sparsity (a module belongs to the
    longest block name prefixing it), and an unused 0.0 where all its modules
    are ignored. Pruned modules are named as ``ratio_handover.pruned_by_targets``.
    """
    targets, ignore = as_list(targets) or [], as_list(ignore) or []
    pruned = pruned_by_targets(model, targets, ignore)
    if not pruned:
        raise ValueError(f"targets={targets} with ignore={ignore} leave nothing to prune")
    by_target: dict[str, set[float]] = {}
    for module_name, target_name in pruned.items():
        blocks = [b for b in block_sparsity if module_name.startswith(b + ".")]
        if not blocks:
            raise ValueError(f"module {module_name!r} lies in none of the blocks {list(block_sparsity)[:3]}")
        by_target.setdefault(target_name, set()).add(block_sparsity[max(blocks, key=len)])
    values = []
    for target_name, _ in match_named_modules(model, targets):
        given = by_target.get(target_name, {_UNUSED})
        if len(given) > 1:
            raise ValueError(f"target {target_name!r} spans blocks with different sparsities {sorted(given)}")
        values.append(given.pop())
    return values
