"""The per-layer report written next to a saved model (``tamp_report.json``).

Modifiers put their sections (``"das"``, ``"amia"``, ``"pattern"``) on the
model; whenever the model is saved with ``save_pretrained`` the checkpoint is
made deployable (``checkpoint.finalize_checkpoint``) and the report is written
beside it, with each pruned layer's sparsity counted in the saved tensors (a
``"checkpoint"`` section says how much of the intended pattern they hold).
llm-compressor writes ``recipe.yaml`` the same way, by wrapping
``save_pretrained``, so ``oneshot(output_dir=...)`` and a later
``model.save_pretrained(dir)`` both get it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import torch
from loguru import logger

from tamp_modifier.allocation import allocate_by_granularity
from tamp_modifier.sparsity_pattern import compare_patterns, describe_pattern, layer_pattern

__all__ = [
    "REPORT_FILE_NAME",
    "attach_report",
    "attached_report",
    "expected_pattern",
    "format_table",
    "load_report",
    "reallocate",
    "pruned_share",
    "realized_sparsity",
    "write_report",
]

REPORT_FILE_NAME = "tamp_report.json"
_ATTR = "_tamp_report"


def realized_sparsity(module: torch.nn.Module) -> float:
    """Fraction of exactly-zero entries in a module's weight."""
    weight = module.weight
    return float((weight == 0).sum().item() / weight.numel())


def pruned_share(modules) -> float:
    """Parameter-weighted share of exactly-zero weights over ``modules``."""
    modules = list(modules)
    zeros = sum(int((m.weight == 0).sum()) for m in modules)
    return zeros / sum(m.weight.numel() for m in modules)


def attached_report(model: torch.nn.Module) -> dict:
    """The report sections modifiers attached to ``model`` (empty if none)."""
    return model.__dict__.get(_ATTR, {})


def attach_report(model: torch.nn.Module, section: str, data: dict) -> None:
    """Store a report section on the model and make ``save_pretrained`` write it."""
    report = model.__dict__.setdefault(_ATTR, {})
    report[section] = data
    _wrap_save_pretrained(model)


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


def _with_realized(model: torch.nn.Module, report: dict, measured: dict[str, dict]) -> dict:
    out = copy.deepcopy(report)
    for key, section in out.items():
        if key in ("pattern", "checkpoint"):
            continue
        for name, layer in section.get("layers", {}).items():
            if name in measured:
                layer["realized"] = measured[name]["sparsity"]
                continue
            try:
                layer["realized"] = realized_sparsity(model.get_submodule(name))
            except AttributeError:
                pass  # not in this model (a report loaded for another one), or no plain weight now
    return out


def _measure_saved(model: torch.nn.Module, directory, expected: dict[str, dict]) -> dict[str, dict]:
    from tamp_modifier.checkpoint import saved_weights

    return {name: {**layer_pattern(weight, expected[name]["mask_structure"]), "num_weights": weight.numel()}
            for name, weight in saved_weights(directory, model, list(expected))}


def write_report(
    model: torch.nn.Module, directory: str | os.PathLike, checkpoint: dict | None = None
) -> Path | None:
    """Write the model's report into ``directory`` atomically; None if it has none.

    The sparsity of every pruned layer is counted in the safetensors files in
    ``directory`` (dequantized where quantized), not in memory.
    """
    report = model.__dict__.get(_ATTR)
    if not report:
        return None
    expected = expected_pattern(report)
    measured = _measure_saved(model, directory, expected) if expected else {}
    out = _with_realized(model, report, measured)
    if expected:
        sized = {n: {**v, "num_weights": measured[n]["num_weights"]} for n, v in expected.items()}
        pattern = compare_patterns(sized, measured)
        out["checkpoint"] = {**(checkpoint or {}), "pattern": pattern}
        _log_saved_pattern(pattern, directory)
    path = Path(directory) / REPORT_FILE_NAME
    text = json.dumps(out, indent=1, sort_keys=False)
    from tamp_modifier.checkpoint import write_text_atomically

    write_text_atomically(path, text)
    return path


def _log_saved_pattern(pattern: dict, directory) -> None:
    if pattern["intact"]:
        logger.info(f"saved checkpoint {directory} keeps the sparsity pattern: {describe_pattern(pattern)}")
    else:
        logger.warning(
            f"saved checkpoint {directory} does NOT keep the sparsity pattern: {describe_pattern(pattern)} "
            f"(per layer in {REPORT_FILE_NAME}, section checkpoint)"
        )


def _wrap_save_pretrained(model: torch.nn.Module) -> None:
    save = getattr(model, "save_pretrained", None)
    if save is None or getattr(save, "_tamp_report", False):
        return

    @functools.wraps(save)
    def save_pretrained_with_report(save_directory, *args, **kwargs):
        from compressed_tensors.distributed import is_source_process

        from tamp_modifier.checkpoint import finalize_checkpoint

        result = save(save_directory, *args, **kwargs)
        if is_source_process():  # under torchrun, one rank writes the files (all hold the same model)
            changes = finalize_checkpoint(model, save_directory)
            write_report(model, save_directory, checkpoint={"config_changes": changes})
        return result

    # functools.wraps copied llm-compressor's `_overridden` flag, so it will
    # not try to wrap this function again (it would need a bound method).
    save_pretrained_with_report._tamp_report = True
    model.save_pretrained = save_pretrained_with_report


def load_report(path: str | os.PathLike) -> dict:
    """Read ``tamp_report.json`` from a file or a saved model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no TAMP report at {path}: run DiversityAwareSparsity and save the model "
            f"(it writes {REPORT_FILE_NAME} next to the checkpoint)"
        )
    with open(path) as f:
        return json.load(f)


def reallocate(
    report: dict | str | os.PathLike,
    sparsity: float,
    allocation: str | None = None,
    max_delta: float | None = None,
    granularity: str | None = None,
) -> dict[str, float]:
    """Per-layer sparsity for a new target from saved DAS scores, no calibration.

    Arguments left as None take the values the report was made with.

    Example::

        >>> ratios = reallocate("pruned-model/", sparsity=0.6)
    """
    if not isinstance(report, dict):
        report = load_report(report)
    das = report.get("das")
    if not das or not das.get("layers"):
        raise ValueError("the report has no DAS section with layer scores to reallocate")
    allocation = allocation or das["allocation"]
    max_delta = das["max_delta"] if max_delta is None else max_delta
    granularity = granularity or das["granularity"]
    layers = das["layers"]
    return allocate_by_granularity(
        scores={n: v["score"] for n, v in layers.items()},
        sizes={n: v["num_weights"] for n, v in layers.items()},
        blocks={n: v["block"] for n, v in layers.items()},
        sparsity=sparsity,
        allocation=allocation,
        max_delta=max_delta,
        granularity=granularity,
    )


def _short_names(names) -> tuple[str, dict[str, str]]:
    """The layers' common dotted prefix, and each name without it (tables fit 100 columns)."""
    names = list(names)
    parts = [n.split(".") for n in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(names) == 1 or len(common) == len(parts[0]):
        common = common[:-1]  # keep at least the last part of every name
    prefix = ".".join(common) + "." if common else ""
    return prefix, {n: n[len(prefix):] for n in names}


def format_table(section: dict) -> str:
    """A plain-text per-layer table of a report section."""
    if section.get("method") == "AdaptiveInputActivation":
        return _format_selection_table(section)
    layers = section.get("layers", {})
    if not layers:
        return "(no layers)"
    term_names = list(dict.fromkeys(t for v in layers.values() for t in v.get("terms", {})))
    prefix, short = _short_names(layers)
    width = max(len("layer"), *(len(n) for n in short.values()))
    head = f"{'layer':<{width}}  {'score':>6}  " + "  ".join(f"{t:>10}" for t in term_names)
    head += f"  {'sparsity':>8}"
    if any("realized" in v for v in layers.values()):
        head += f"  {'realized':>8}"
    lines = [f"layers under {prefix}"] if prefix else []
    lines += [head, "-" * len(head)]
    for name, v in layers.items():
        terms = "  ".join(
            f"{v['terms'][t]:>10.4f}" if t in v.get("terms", {}) else f"{'-':>10}" for t in term_names
        )
        line = f"{short[name]:<{width}}  {v['score']:>6.4f}  {terms}  {v['assigned']:>8.4f}"
        if "realized" in v:
            line += f"  {v['realized']:>8.4f}"
        lines.append(line)
    glob = section.get("global", {})
    if glob:
        lines.append(f"global (parameter-weighted) sparsity: {glob.get('assigned', float('nan')):.4f}")
    return "\n".join(lines)


def _format_selection_table(section: dict) -> str:
    layers = section.get("layers", {})
    if not layers:
        return "(no layers)"
    modalities = list(next(iter(layers.values()))["selected"])
    prefix, short = _short_names(layers)
    width = max(len("layer"), *(len(n) for n in short.values()))
    head = f"{'layer':<{width}}  " + "  ".join(f"{'sel ' + m:>10}" for m in modalities)
    head += f"  {'share':>7}  {'sparsity':>8}  {'realized':>8}"
    lines = [f"layers under {prefix}"] if prefix else []
    lines += [head, "-" * len(head)]
    for name, v in layers.items():
        sparsity = v["mask_structure"] if v["sparsity"] is None else f"{v['sparsity']:.4f}"
        realized = f"{v['realized']:.4f}" if "realized" in v else "-"
        lines.append(
            f"{short[name]:<{width}}  " + "  ".join(f"{v['selected'][m]:>10}" for m in modalities)
            + f"  {v['share']:>7.2%}  {sparsity:>8}  {realized:>8}"
        )
    share = section.get("selected_share", {})
    lines.append("share of tokens selected: " + ", ".join(
        f"{m} {s:.2%}" for m, s in share.items() if s is not None))
    return "\n".join(lines)
