"""The report our modifiers build during a run, kept on the model until it is saved.

Each modifier attaches one section (``"das"``, ``"amia"``, ``"pattern"``) to the
model; saving it (``tamp_modifier.deploy.save_hook``) writes them all to
``tamp_report.json`` beside the checkpoint. Nothing here touches files.
"""

from __future__ import annotations

import torch

__all__ = ["attach_section", "attached_report", "expected_pattern"]

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
