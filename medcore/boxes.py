"""Uni-Med box strings ``{<x1><y1><x2><y2>}`` on the 0-100 integer grid: the readers write them as
answers (SLAKE refer / identify), scoring parses them (REC IoU in ``lightningmodules/metrics/boxes.py``).

Parsing rules (decided here; Uni-Med's own script only accepts a box at the very start with
spaces removed and does no range check):
- the first box-shaped ``{<..><..><..><..>}`` anywhere in the text decides; later boxes are
  ignored even when the first one is invalid;
- whitespace around braces, brackets and numbers is tolerated;
- each field must be a plain non-negative integer within 0..grid, with x1 <= x2 and y1 <= y2;
- anything else (missing brace, sign, decimal, out of range, swapped corners) gives None.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["Box", "format_box", "parse_box"]

Box = tuple[int, int, int, int]

_FIELD = r"\s*<([^<>{}]*)>"
_BOX_RE = re.compile(r"\{" + _FIELD * 4 + r"\s*\}")
_INT_RE = re.compile(r"[0-9]+")


def parse_box(text: str, grid: int = 100) -> Box | None:
    """First ``{<x1><y1><x2><y2>}`` in ``text`` as ints, or None when absent or invalid."""
    if not isinstance(text, str):
        return None
    match = _BOX_RE.search(text)
    if match is None:
        return None
    fields = [field.strip() for field in match.groups()]
    if not all(_INT_RE.fullmatch(field) for field in fields):
        return None
    x1, y1, x2, y2 = (int(field) for field in fields)
    if max(x1, y1, x2, y2) > grid or x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def format_box(box: Sequence[int], grid: int = 100) -> str:
    """``(x1, y1, x2, y2)`` -> ``"{<x1><y1><x2><y2>}"``; ValueError for an invalid box."""
    if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        raise ValueError(f"a box is four ints, got {box!r}")
    x1, y1, x2, y2 = box
    if min(box) < 0 or max(box) > grid or x2 < x1 or y2 < y1:
        raise ValueError(f"box {tuple(box)} is not x1<=x2, y1<=y2 within 0..{grid}")
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"
