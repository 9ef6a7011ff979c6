"""IoU of boxes and referring-expression (REC) scores over Uni-Med box strings.

The box text format ``{<x1><y1><x2><y2>}`` and its parsing rules live in :mod:`medcore.boxes` (the
readers write it too).
"""

from __future__ import annotations

from collections.abc import Sequence

from medcore.boxes import parse_box

__all__ = ["box_iou", "rec_scores"]


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
