"""The one way a field or an argument is checked, in every part of the package.

Each check returns the value it accepts and raises a ValueError whose one line
names the field, what it must be and what it got, so that a recipe field, a
keyword of ``enable_token_pruning`` and a pure function's argument all fail alike.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["above", "as_list", "at_least", "in_range", "one_of"]


def one_of(field: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {tuple(choices)}, got {value!r}")
    return value


def in_range(field: str, value, low: float, high: float, *, high_inclusive: bool = False, why: str = ""):
    """``value`` if it is a number in ``[low, high)`` (``[low, high]`` with ``high_inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        inside = False
    else:  # written so that NaN is outside
        inside = low <= value and (value <= high if high_inclusive else value < high)
    if not inside:
        bracket = "]" if high_inclusive else ")"
        because = f": {why}" if why else ""
        raise ValueError(f"{field} must be in [{low:g}, {high:g}{bracket}, got {value!r}{because}")
    return value


def at_least(field: str, value, minimum: float, *, why: str = ""):
    """``value`` if it is a number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:  # NaN too
        raise ValueError(f"{field} must be >= {minimum:g}, got {value!r}" + (f" ({why})" if why else ""))
    return value


def above(field: str, value, bound: float):
    """``value`` if it is a number > ``bound`` (a strict lower bound: a scale, a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > bound:
        raise ValueError(f"{field} must be > {bound:g}, got {value!r}")
    return value


def as_list(value) -> list | None:
    """A list of patterns from a list, a tuple or one bare string (None stays None).

    A bare ``"Linear"`` where llm-compressor expects a list is its classic silent
    failure: the string is iterated letter by letter and matches nothing.
    """
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)
