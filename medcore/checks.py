"""Config checks as data: a check returns the problems it found as (dotted key, reason) pairs.

The config dataclasses (``pipeline/config/schema.py``, ``datamodules/specs.py``) list their own problems with
these; ``pipeline/config/validate.py`` turns the first one into an error naming the file that set the key.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Problem", "choice", "positive"]

Problem = tuple[str, str]  # (dotted key, reason)


def choice(key: str, value: Any, allowed: Iterable[Any]) -> list[Problem]:
    allowed = tuple(allowed)
    if value in allowed:
        return []
    return [(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")]


def positive(key: str, value: float, *, allow_zero: bool = False) -> list[Problem]:
    if value < 0 or (value == 0 and not allow_zero):
        return [(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")]
    return []
