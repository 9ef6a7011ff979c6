"""Uni-Med box strings ``{<x1><y1><x2><y2>}`` on the 0-100 integer grid, IoU and REC scores.

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

__all__ = ["Box", "box_iou", "format_box", "parse_box", "rec_scores"]

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


def box_iou(a: Sequence[float], b: Sequence[float], inclusive: bool = False) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when the union is empty.

    ``inclusive=True`` uses the +1 pixel convention of Uni-Med's ``computeIoU`` (meant for pixel
    coordinates); the default treats corners as continuous coordinates.
    """
    extra = 1 if inclusive else 0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + extra)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + extra)
    inter = iw * ih
    area_a = (a[2] - a[0] + extra) * (a[3] - a[1] + extra)
    area_b = (b[2] - b[0] + extra) * (b[3] - b[1] + extra)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def rec_scores(
    preds: Sequence[str | None], gts: Sequence[str | Sequence[int]], grid: int = 100, inclusive: bool = False
) -> dict[str, float]:
    """Referring-expression comprehension: mean IoU and accuracy at IoU > 0.5 (strict).

    An unparseable prediction scores IoU 0 and is counted in ``rec_unparseable``. Ground truths
    are box strings or 4-sequences on the same grid; an invalid one raises ValueError.
    With no items only ``rec_count`` is returned.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth boxes")
    ious: list[float] = []
    unparseable = 0
    for index, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        gt_box = parse_box(gt, grid) if isinstance(gt, str) else gt
        if gt_box is None or len(gt_box) != 4:
            raise ValueError(f"ground-truth box {index} is invalid: {gt!r}")
        pred_box = parse_box(pred, grid) if isinstance(pred, str) else None
        if pred_box is None:
            unparseable += 1
            ious.append(0.0)
        else:
            ious.append(box_iou(pred_box, gt_box, inclusive))
    out = {"rec_count": float(len(ious)), "rec_unparseable": float(unparseable)}
    if ious:
        out["rec_miou"] = sum(ious) / len(ious)
        out["rec_acc@0.5"] = sum(iou > 0.5 for iou in ious) / len(ious)
    return out
