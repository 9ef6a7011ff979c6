"""MedPLIB grounding scores: per-image IoU at original resolution, Dice = 2 IoU / (1 + IoU).

mDice and mIoU are plain means over images (an empty union or a missing prediction scores 0,
unlike MONAI / torchmetrics, which leave empty-ground-truth cases out), also per modality.
Resizing predictions to the ground-truth resolution is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["binarize", "dice_from_iou", "mask_iou", "segmentation_scores"]

MaskLike = np.ndarray | torch.Tensor


def binarize(logits: MaskLike, threshold: float = 0.1) -> MaskLike:
    """sigmoid(logits) > threshold, returned as a bool array/tensor of the input's kind."""
    if isinstance(logits, torch.Tensor):
        return torch.sigmoid(logits.float()) > threshold
    probs = torch.sigmoid(torch.as_tensor(np.asarray(logits, dtype=np.float32)))
    return (probs > threshold).numpy()


def _as_numpy(mask: Any) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy()
    return np.asarray(mask)


def _pred_bool(mask: Any, index: int | None = None) -> np.ndarray:
    arr = _as_numpy(mask)
    if arr.dtype == bool:
        return arr
    # Refuse logits/probabilities passed by mistake: a prediction must already be binary.
    if not ((arr == 0) | (arr == 1)).all():
        where = "" if index is None else f" {index}"
        raise ValueError(f"prediction{where} is not binary; call binarize() on logits first")
    return arr.astype(bool)


def _gt_bool(mask: Any) -> np.ndarray:
    arr = _as_numpy(mask)
    # Dataset convention: pixel >= 1 is foreground (masks may be stored as 0/255).
    return arr if arr.dtype == bool else arr >= 1


def _iou(pred: np.ndarray | None, gt: np.ndarray, index: int | None) -> float:
    if pred is None:
        return 0.0
    if pred.shape != gt.shape:
        where = "" if index is None else f" at index {index}"
        raise ValueError(
            f"prediction shape {pred.shape} != ground-truth shape {gt.shape}{where}; "
            "resize predictions to the original resolution first"
        )
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 0.0
    return float(np.logical_and(pred, gt).sum() / union)


def mask_iou(pred: MaskLike | None, gt: MaskLike) -> float:
    """|pred & gt| / |pred | gt|; 0 when the union is empty or no mask was produced (None)."""
    return _iou(None if pred is None else _pred_bool(pred), _gt_bool(gt), None)


def dice_from_iou(iou: float) -> float:
    """Dice of a single image from its IoU: 2 IoU / (1 + IoU)."""
    return 2.0 * iou / (1.0 + iou)


def segmentation_scores(
    preds: Sequence[MaskLike | None], gts: Sequence[MaskLike], modalities: Sequence[str] | None = None
) -> dict[str, float]:
    """``mdice``, ``miou``, ``count`` and per modality ``mdice/<m>``, ``miou/<m>``, ``count/<m>``.

    Predictions are binary masks (or None when the model produced none) with exactly the
    ground truth's shape; a mismatch raises ValueError naming the index.
    With no items only ``count`` is returned.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth masks")
    if modalities is not None and len(modalities) != len(gts):
        raise ValueError(f"{len(modalities)} modalities but {len(gts)} ground-truth masks")
    ious: list[float] = []
    for index, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        pred_arr = None if pred is None else _pred_bool(pred, index)
        ious.append(_iou(pred_arr, _gt_bool(gt), index))
    dices = [dice_from_iou(iou) for iou in ious]
    out: dict[str, float] = {"count": float(len(ious))}
    if ious:
        out["mdice"] = float(np.mean(dices))
        out["miou"] = float(np.mean(ious))
    if modalities is not None:
        groups: dict[str, list[int]] = {}
        for index, modality in enumerate(modalities):
            groups.setdefault(str(modality), []).append(index)
        for modality in sorted(groups):
            idx = groups[modality]
            out[f"mdice/{modality}"] = float(np.mean([dices[i] for i in idx]))
            out[f"miou/{modality}"] = float(np.mean([ious[i] for i in idx]))
            out[f"count/{modality}"] = float(len(idx))
    return out


def monai_dice(preds: Sequence[MaskLike | None], gts: Sequence[MaskLike]) -> dict[str, float]:
    """MONAI's DiceMetric over the same masks, reported alongside MedPLIB's mDice.

    MONAI leaves out images whose ground truth is empty (NaN, ``ignore_empty=True``) and a missing
    prediction counts as an empty mask, so this number differs from ``mdice`` by design.
    """
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=True)
    for index, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        gt_arr = _gt_bool(gt)
        pred_arr = np.zeros_like(gt_arr) if pred is None else _pred_bool(pred, index)
        if pred_arr.shape != gt_arr.shape:
            raise ValueError(f"prediction {index} has shape {pred_arr.shape}, ground truth {gt_arr.shape}")
        metric(y_pred=_as_batch(pred_arr), y=_as_batch(gt_arr))
    counted = sum(bool(_gt_bool(g).any()) for g in gts)
    value = float(metric.aggregate().item()) if counted else float("nan")
    return {"monai_dice": value, "monai_dice_count": float(counted)}


def _as_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
