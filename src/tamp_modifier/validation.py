"""One check shared by the recipe fields and the pure functions."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["one_of"]


def one_of(field: str, value, choices: Sequence):
    """Return ``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {tuple(choices)}, got {value!r}")
    return value
