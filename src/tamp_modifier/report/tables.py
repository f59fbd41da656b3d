"""Plain-text per-layer tables of report sections (logs, ``tamp-prune``'s summary)."""

from __future__ import annotations

__all__ = ["format_table"]


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
