"""IoU of boxes and referring-expression (REC) scores over Uni-Med box strings.

Two REC scores, under their own names:

- :func:`grid_rec_scores` (``rec_*`` keys): medpipe's own, the
  predicted box against the ground-truth box both on the 0-100 grid, continuous corners, with the
  tolerant parsing of :mod:`medcore.boxes` (the box may appear anywhere, fields in 0..grid).
- :func:`uni_med_rec_scores` (``miou`` / ``acc`` as Uni-Med's ``eval_ref.py`` prints them): the
  released rule, reproduced step by step (github.com/tsinghua-msiip/Uni-Med @ 63b9dfb):

  1. ``answer.replace("<unk>", "").replace(" ", "").strip()`` (eval_ref.py:64);
  2. the answer must *start* with ``{<d><d><d><d>}``, each field 1-3 digits (``re.match`` of
     ``\\{<\\d{1,3}><\\d{1,3}><\\d{1,3}><\\d{1,3}>\\}``, eval_ref.py:65-66); no range or order check;
     anything else scores IoU 0 (eval_ref.py:81-82);
  3. the grid box goes to the original image's pixels: ``x / 100 * W``, ``y / 100 * H``
     (eval_ref.py:67-74, ``--res`` 100; ``image_size`` is PIL's ``(W, H)``, slake_dataset.py:150);
  4. the ground truth is detection.json's pixel ``[x, y, w, h]`` as float32 (``torch.Tensor``,
     slake_dataset.py:146) turned into ``[x, y, x + w, y + h]`` (eval_ref.py:57-62);
  5. ``computeIoU`` (uni_med/common/eval_utils.py:62-74): intersection and areas with the +1 pixel
     convention; mIoU is the plain mean, acc the share with IoU strictly above 0.5 (eval_ref.py:101-102).

  Deliberate difference: where ``computeIoU`` would divide by a zero union (a prediction with swapped
  corners whose negative area cancels the ground truth's) the script crashes; here the IoU is 0.

The box text format ``{<x1><y1><x2><y2>}`` and medpipe's parsing rules live in :mod:`medcore.boxes`
(the readers write it too).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medcore.boxes import parse_box

__all__ = [
    "MissingGeometryError",
    "box_iou",
    "grid_rec_scores",
    "parse_uni_med_box",
    "uni_med_pixel_box",
    "uni_med_rec_scores",
]

UNI_MED_GRID = 100.0  # eval_ref.py --res


class MissingGeometryError(ValueError):
    """A REC item lacks what the pixel-space score needs: the ground-truth box or the image size."""


def box_iou(a: Sequence[float], b: Sequence[float], inclusive: bool = False) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when the union is empty (or negative).

    ``inclusive=True`` uses the +1 pixel convention of Uni-Med's ``computeIoU`` (meant for pixel
    coordinates), operation for operation; the default treats corners as continuous coordinates.
    """
    extra = 1 if inclusive else 0
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]) + extra)
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]) + extra)
    inter = iw * ih
    area_a = (a[2] - a[0] + extra) * (a[3] - a[1] + extra)
    area_b = (b[2] - b[0] + extra) * (b[3] - b[1] + extra)
    union = area_a + area_b - inter
    # A positive intersection implies both boxes have positive sides, so a union <= 0 comes with an
    # intersection of 0: the script's 0 / union is 0 (or -0.0), or a ZeroDivisionError.
    return inter / union if union > 0 else 0.0


def grid_rec_scores(
    preds: Sequence[str | None], gts: Sequence[str | Sequence[int]], grid: int = 100, inclusive: bool = False
) -> dict[str, float]:
    """medpipe's REC score on the grid: mean IoU and accuracy at IoU > 0.5 (strict).

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


# ------------------------------------------------------------------------------ Uni-Med (pixels)

_UNI_MED_BOX = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_DIGITS = re.compile(r"\d+")


def parse_uni_med_box(answer: str | None) -> tuple[int, int, int, int] | None:
    """The grid box that eval_ref.py reads from ``answer``, or None where it scores 0.

    Only "<unk>" and the space character are removed (a tab or newline inside the box fails, at the
    ends it is stripped); ``\\d`` is Python's (Unicode digits count, as in the script).
    """
    if not isinstance(answer, str):
        return None
    text = answer.replace("<unk>", "").replace(" ", "").strip()
    if _UNI_MED_BOX.match(text) is None:
        return None
    x1, y1, x2, y2 = (int(number) for number in _DIGITS.findall(text)[:4])
    return x1, y1, x2, y2


def _float32(value: float) -> float:
    # torch.Tensor(detection box) holds float32; the script adds the .tolist() values in float64.
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def uni_med_pixel_box(
    grid_box: Sequence[int], image_size: Sequence[float], grid: float = UNI_MED_GRID
) -> tuple[float, ...]:
    """A grid box in the original image's pixels, as eval_ref.py:69-74 computes it (W, H order)."""
    width, height = (_float32(v) for v in image_size)
    x1, y1, x2, y2 = grid_box
    return (x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height)


def _xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = (_float32(v) for v in box)
    return (x, y, x + w, y + h)


def _geometry(item: Mapping[str, Any], index: int) -> tuple[Sequence[float], Sequence[float]]:
    name = item.get("id", f"#{index}")
    box, size = item.get("box"), item.get("image_size")
    if box is None or size is None:
        missing = " and ".join(n for n, v in (("ground-truth box", box), ("original image size", size)) if v is None)
        raise MissingGeometryError(
            f"record {name}: Uni-Med REC scores in the original image's pixels and needs the record's "
            f"{missing} (box: detection.json [x, y, w, h]; image_size: (W, H))"
        )
    if len(box) != 4 or len(size) != 2 or not all(float(v) > 0 for v in size):
        raise ValueError(f"record {name}: box must be [x, y, w, h] and image_size (W, H) > 0, got {box!r}, {size!r}")
    return box, size


def uni_med_rec_scores(items: Iterable[Mapping[str, Any]], grid: float = UNI_MED_GRID) -> dict[str, float]:
    """Uni-Med's REC score, as eval_ref.py computes it (see the module docstring).

    ``items``: mappings with ``pred`` (the generated text), ``box`` (the ground truth in the original
    image's pixels, ``[x, y, w, h]``), ``image_size`` (``(W, H)``) and ``id`` (for errors). A record
    without box or size raises :class:`MissingGeometryError` naming it. Keys: ``miou`` and ``acc`` (the
    names eval_ref.py prints; acc is IoU > 0.5), ``count``, ``unparseable``.
    """
    ious: list[float] = []
    unparseable = 0
    for index, item in enumerate(items):
        box, size = _geometry(item, index)
        grid_box = parse_uni_med_box(item.get("pred"))
        if grid_box is None:
            unparseable += 1
            ious.append(0.0)
            continue
        ious.append(box_iou(uni_med_pixel_box(grid_box, size, grid), _xywh_to_xyxy(box), inclusive=True))
    out = {"count": float(len(ious)), "unparseable": float(unparseable)}
    if ious:
        scores = np.array(ious, dtype=np.float64)  # the script's numpy means (pairwise summation)
        out["miou"] = float(scores.mean())
        out["acc"] = float((scores > 0.5).mean())
    return out
