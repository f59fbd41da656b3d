"""A recipe checked as oneshot will read it, before any model is loaded.

llm-compressor parses the recipe only inside ``oneshot``, after the model and
the calibration set are loaded (minutes for a 7B model), and reports a bad field
as a pydantic traceback. ``recipe_problem`` parses it up front with
llm-compressor's own parser and says what is wrong in one line, with the closest
valid name for a misspelt modifier or field. ``group_size_problem`` checks, from
the model's ``config.json`` alone, that a grouped quantization (W4A16's groups of
128 input columns) divides every width of the language model it quantizes.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

__all__ = ["group_size_problem", "recipe_problem"]


def _closest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _registered_modifiers() -> dict:
    """Every modifier class llm-compressor's recipe parser can find, by name."""
    from llmcompressor.modifiers.factory import ModifierFactory

    if not ModifierFactory._main_registry:
        ModifierFactory.refresh()
    return {
        **ModifierFactory._main_registry,
        **ModifierFactory._experimental_registry,
        **ModifierFactory._registered_registry,
    }


def _pydantic_message(error, recipe: Path) -> str:
    first = error.errors()[0]
    field = ".".join(str(x) for x in first["loc"]) or "(modifier)"
    modifier = error.title
    if first["type"] == "extra_forbidden":
        from llmcompressor.modifiers import Modifier

        cls = _registered_modifiers().get(modifier)
        # Its own settings, not the lifecycle bookkeeping every Modifier has.
        fields = sorted(set(cls.model_fields) - set(Modifier.model_fields)) if cls else []
        return (
            f"{recipe}: {modifier} has no field {field!r}{_closest(field, fields)} "
            f"(its fields: {', '.join(fields)})"
        )
    message = first["msg"].removeprefix("Value error, ")
    return (
        f"{recipe}: {modifier}.{field}: {message}"
        if field != "(modifier)"
        else f"{recipe}: {modifier}: {message}"
    )


def recipe_problem(recipe: str | Path):
    """``(message, parsed recipe)``: message is None when llm-compressor parses it cleanly.

    Import ``tamp_modifier`` first (it registers TAMP's modifiers).
    """
    import pydantic
    from llmcompressor.recipe import Recipe

    try:
        parsed = Recipe.create_instance(str(recipe))
    except pydantic.ValidationError as error:
        return _pydantic_message(error, Path(recipe)), None
    except ValueError as error:
        missing = re.search(r"No modifier of type '([^']+)' found", str(error))
        if missing:
            name = missing.group(1)
            return (
                f"{recipe}: no modifier named {name!r}{_closest(name, _registered_modifiers())} "
                "(TAMP's are DiversityAwareSparsity and AdaptiveInputActivation)"
            ), None
        return f"{recipe}: {error}", None
    return None, parsed


def _widths(config: dict) -> dict[str, int]:
    """Input widths of the language model's Linears, from a config.json dict."""
    text = config.get("text_config") or config
    hidden = text.get("hidden_size")
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    widths = {
        "hidden_size": hidden,
        "intermediate_size": text.get("intermediate_size"),
        "num_attention_heads x head_dim": heads * head_dim if heads and head_dim else None,
    }
    return {k: v for k, v in widths.items() if isinstance(v, int)}


def _weight_schemes(modifier) -> list:
    """The weight quantization arguments a quantization modifier applies."""
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    schemes = []
    scheme = getattr(modifier, "scheme", None)
    targets = getattr(modifier, "targets", None) or ["Linear"]
    if isinstance(scheme, str):
        schemes.append(preset_name_to_scheme(scheme, targets))
    elif isinstance(scheme, dict):
        schemes += [preset_name_to_scheme(name, t) for name, t in scheme.items()]
    for group in (getattr(modifier, "config_groups", None) or {}).values():
        schemes.append(
            group if isinstance(group, QuantizationScheme) else QuantizationScheme.model_validate(group)
        )
    return [s.weights for s in schemes if s.weights is not None]


def group_size_problem(parsed_recipe, config: dict, recipe_name: str) -> str | None:
    """One line if a grouped weight quantization does not divide the model's widths."""
    widths = _widths(config)
    for modifier in getattr(parsed_recipe, "modifiers", []):
        for weights in _weight_schemes(modifier):
            size = getattr(weights, "group_size", None)
            if str(getattr(weights, "strategy", "")).endswith("group") and size:
                bad = {k: v for k, v in widths.items() if v % size}
                if bad:
                    listed = ", ".join(f"{k} = {v}" for k, v in bad.items())
                    return (
                        f"{recipe_name} quantizes weights in groups of {size} input columns, but "
                        f"this model's widths ({listed}) are not all multiples of {size}: use a recipe whose "
                        f"group_size divides it (config_groups with group_size "
                        f"{_largest_divisor(list(widths.values()), size)}) or strategy: channel"
                    )
    return None


def _largest_divisor(widths: list[int], limit: int) -> int:
    """The largest power of two up to ``limit`` that divides every width (at least 1)."""
    size = limit
    while size > 1 and any(w % size for w in widths):
        size //= 2
    return size
