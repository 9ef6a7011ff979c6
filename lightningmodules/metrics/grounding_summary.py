"""MedPLIB evaluation summaries from prediction rows (one per sample, after de-duplication by id).

Grounding (:func:`grounding_summary`):

``GroundingVLMModule.test_step`` puts per-image ``iou`` (MedPLIB: sigmoid > threshold, 0 for an empty
union or no mask), ``pixel_dice`` (MONAI's per-image Dice, None for an empty target) and
``seg_produced`` into the rows of samples with a target mask (masks themselves are not kept, so a big
test set costs no memory; ``report.segmentation_report`` is the same computation on mask lists).
mDice = mean of 2 IoU / (1 + IoU)
and mIoU = mean IoU over images (the same numbers as ``segmentation.segmentation_scores`` on the
masks), per modality too; ``monai_dice`` = mean pixel Dice over non-empty targets (MONAI DiceMetric's
``ignore_empty``); ``no_mask`` = images whose answer had no ``<SEG>`` (scored with the empty fallback).

Region VQA (:func:`region_vqa_summary`): MeCoVQA-Region rows (task ``region``) under MedPLIB's protocol
(closed: exact match after normalisation; open: token recall / F1), as ``region/<metric>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from lightningmodules.metrics.protocols import score_protocol
from lightningmodules.metrics.segmentation import dice_from_iou


def grounding_summary(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """``seg/mdice``, ``seg/miou``, ``seg/count``, ``seg/no_mask``, ``seg/monai_dice`` and per modality
    ``seg/mdice/<m>``, ``seg/miou/<m>``, ``seg/count/<m>``; empty when no row has a mask score."""
    scored = [r for r in rows if r.get("iou") is not None]
    if not scored:
        return {}
    ious = np.array([float(r["iou"]) for r in scored])
    out = {
        "seg/mdice": float(np.mean([dice_from_iou(i) for i in ious])),
        "seg/miou": float(ious.mean()),
        "seg/count": float(len(scored)),
        "seg/no_mask": float(sum(not r.get("seg_produced", True) for r in scored)),
    }
    pixel = [float(r["pixel_dice"]) for r in scored if r.get("pixel_dice") is not None]
    out["seg/monai_dice"] = float(np.mean(pixel)) if pixel else float("nan")
    by_modality: dict[str, list[float]] = {}
    for row in scored:
        by_modality.setdefault(str(row.get("modality") or "unknown"), []).append(float(row["iou"]))
    for modality in sorted(by_modality):
        values = by_modality[modality]
        out[f"seg/mdice/{modality}"] = float(np.mean([dice_from_iou(i) for i in values]))
        out[f"seg/miou/{modality}"] = float(np.mean(values))
        out[f"seg/count/{modality}"] = float(len(values))
    return out


def region_vqa_summary(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """``region/<metric>`` of MedPLIB's protocol over the ``region`` task's rows (empty without any)."""
    items = [
        {"pred": r.get("text"), "gt": r["answer"], "answer_type": r["answer_type"]}
        for r in rows
        if r.get("task") == "region"
    ]
    if not items:
        return {}
    return {f"region/{k}": float(v) for k, v in score_protocol("medplib", items).items()}
