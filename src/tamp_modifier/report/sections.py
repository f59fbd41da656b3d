"""The report our modifiers build during a run, kept on the model until it is saved.

Each modifier attaches one section (``"das"``, ``"amia"``, ``"pattern"``) to the
model; saving it (``tamp_modifier.deploy.save_hook``) writes them all to
``tamp_report.json`` beside the checkpoint. Nothing here touches files.
"""

from __future__ import annotations

import torch

__all__ = [
    "amia_layer_row", "amia_section", "attach_section", "attached_report", "das_section", "expected_pattern",
]

# The model's __dict__, not an attribute: nn.Module.__setattr__ would not take a dict
# quietly, and this way the sections never reach the state dict.
_ATTR = "_tamp_report"


def attached_report(model: torch.nn.Module) -> dict:
    """The report sections modifiers attached to ``model`` (empty if none)."""
    return model.__dict__.get(_ATTR, {})


def attach_section(model: torch.nn.Module, section: str, data: dict) -> None:
    """Store a report section on the model (``tamp_modifier.deploy.save_hook`` writes them on save)."""
    model.__dict__.setdefault(_ATTR, {})[section] = data


def das_section(settings: dict, *, tokens: dict[str, int] | None, samples: int | None, ranks: int,
                pruner: str | None, blocks: dict[str, str], sizes: dict[str, int], columns: dict[str, int],
                layers: dict[str, dict], allocated: dict[str, float], assigned: dict[str, float]) -> dict:
    """DiversityAwareSparsity's section: its settings, the run's totals and one entry per scored layer.

    ``settings`` are DAS's (sparsity, allocation, max_delta, diversity, granularity,
    modality_token_ids), ``layers`` each layer's ``score`` and ``terms``;
    ``allocated`` / ``assigned`` its ratio before / after snapping to whole weights
    per row (or as the pruner took it). The global ratios are weighted by
    ``sizes``, the layers' weight counts.
    """
    total = sum(sizes.values())
    return {
        "method": "DiversityAwareSparsity",
        **settings,
        "tokens": tokens,
        "samples": samples,
        "ranks": ranks,
        "pruner": pruner,
        "global": {
            "allocated": sum(allocated[n] * sizes[n] for n in sizes) / total,
            "assigned": sum(assigned[n] * sizes[n] for n in sizes) / total,
        },
        "layers": {
            n: {
                "block": blocks[n],
                "num_weights": sizes[n],
                "columns": columns[n],
                **layers[n],
                "allocated": allocated[n],
                "assigned": assigned[n],
            }
            for n in sizes
        },
    }


def expected_pattern(report: dict) -> dict[str, dict]:
    """What the recipe's pruning step meant to leave, per layer, from a report.

    ``{name: {"sparsity": float | None, "mask_structure": "0:0" | "N:M"}}``: from
    AMIA's section when AMIA pruned, else from DAS's assigned ratios when a pruner
    followed DAS. Empty for a profiling run (nothing was pruned).
    """
    amia = report.get("amia")
    if amia and amia.get("layers"):
        return {n: {"sparsity": v["sparsity"], "mask_structure": v["mask_structure"]}
                for n, v in amia["layers"].items()}
    das = report.get("das")
    if das and das.get("pruner") and das.get("layers"):
        return {n: {"sparsity": v["assigned"], "mask_structure": "0:0"} for n, v in das["layers"].items()}
    return {}


def amia_layer_row(sparsity: float | None, mask_structure: str, modalities: list[str], selected: list[int],
                   seen: list[int], statistic: dict) -> dict:
    """One pruned Linear's row of AMIA's section.

    :param sparsity: the ratio it was pruned at; None for N:M (the pattern fixes it)
    :param selected, seen: tokens selected and seen, per modality (in ``modalities``' order)
    :param statistic: what the statistic keeps for the report (SparseGPT's samples and loss)
    """
    return {
        "sparsity": None if sparsity is None else float(sparsity),
        "mask_structure": mask_structure,
        "selected": dict(zip(modalities, selected)),
        "tokens": dict(zip(modalities, seen)),
        "share": sum(selected) / max(sum(seen), 1),
        **statistic,
    }


def amia_section(layers: dict[str, dict], modalities: list[str], *, token_selection: str, reconstruction: str,
                 token_weighting: str, mask_structure: str, settings: dict, from_das: bool, ranks: int,
                 seconds: dict[str, float]) -> dict:
    """AMIA's section (``"amia"``): its choices and settings, and its rows (``amia_layer_row``).

    ``selected_share`` is, per modality, the share of all its tokens (over every
    layer) that were selected; None for a modality no layer saw.
    """
    totals = {m: [0, 0] for m in modalities}
    for layer in layers.values():
        for m in modalities:
            totals[m][0] += layer["selected"][m]
            totals[m][1] += layer["tokens"][m]
    return {
        "method": "AdaptiveInputActivation",
        "token_selection": token_selection,
        "reconstruction": reconstruction,
        "token_weighting": token_weighting,
        "mask_structure": mask_structure,
        "settings": settings,
        "from_das": from_das,
        "ranks": ranks,
        "selected_share": {m: (s / t if t else None) for m, (s, t) in totals.items()},
        "seconds": dict(seconds),
        "layers": layers,
    }
