"""Config checks as data: a check returns the problems it found as (dotted key, reason) pairs.

The config dataclasses (``pipeline/config/schema.py``, ``datamodules/specs.py``) list their own problems with
these; ``pipeline/config/validate.py`` turns the first one into an error naming the file that set the key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["Problem", "choice", "finite", "interval", "positive"]

Problem = tuple[str, str]  # (dotted key, reason)


def choice(key: str, value: Any, allowed: Iterable[Any]) -> list[Problem]:
    allowed = tuple(allowed)
    if value in allowed:
        return []
    return [(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")]


def finite(key: str, value: Any) -> list[Problem]:
    """A NaN or an infinity in ``value`` (a number, or a list / dict of them, looked into): YAML's ``.nan`` /
    ``.inf`` and ``nan`` / ``inf`` on the command line are floats, and NaN passes every range check written
    as a comparison (``nan < 0`` is false). Validation runs it over every field of every config section."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(key, f"must be a finite number, got {value}")]
    if isinstance(value, (list, tuple)) and any(finite(key, v) for v in value):
        return [(key, f"must hold finite numbers, got {list(value)}")]
    if isinstance(value, dict):
        return [p for name, v in value.items() for p in finite(f"{key}.{name}", v)]
    return []


def positive(key: str, value: float, *, allow_zero: bool = False) -> list[Problem]:
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        return [(key, f"must be a finite number {bound}, got {value}")]
    if value < 0 or (value == 0 and not allow_zero):
        return [(key, f"must be {bound}, got {value}")]
    return []


def interval(key: str, value: float, low: float, high: float, *, include_high: bool = False) -> list[Problem]:
    """``low <= value < high`` (``<= high`` with ``include_high``); NaN and infinities fail."""
    inside = math.isfinite(value) and low <= value and (value <= high if include_high else value < high)
    if inside:
        return []
    return [(key, f"must be in [{low}, {high}{']' if include_high else ')'}, got {value}")]
