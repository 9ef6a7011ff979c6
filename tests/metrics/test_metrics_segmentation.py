"""MedPLIB segmentation scores against direct numpy computations."""

import numpy as np
import pytest
import torch

from lightningmodules.metrics import binarize, dice_from_iou, mask_iou, segmentation_scores


def _np_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.sum(pred | gt)
    return 0.0 if union == 0 else np.sum(pred & gt) / union


def test_binarize_threshold_on_sigmoid():
    # sigmoid(x) > 0.1  <=>  x > log(0.1 / 0.9) = -2.197...
    logits = [-3.0, -2.3, -2.1, 0.0, 5.0]
    out_t = binarize(torch.tensor(logits), 0.1)
    assert out_t.dtype == torch.bool and out_t.tolist() == [False, False, True, True, True]
    out_n = binarize(np.array(logits), 0.1)
    assert out_n.dtype == bool and out_n.tolist() == [False, False, True, True, True]
    # sigmoid(0) = 0.5 is not > 0.5
    assert binarize(np.array(logits), 0.5).tolist() == [False, False, False, False, True]


def test_mask_iou_random_against_numpy():
    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(rng.integers(1, 12, size=2))
        pred = rng.random(shape) < rng.random()
        gt = rng.random(shape) < rng.random()
        expected = _np_iou(pred, gt)
        assert mask_iou(pred, gt) == pytest.approx(expected, abs=1e-12)
        assert mask_iou(torch.from_numpy(pred), torch.from_numpy(gt)) == pytest.approx(expected, abs=1e-12)


def test_mask_iou_special_cases():
    empty = np.zeros((4, 4), dtype=bool)
    assert mask_iou(empty, empty) == 0.0  # empty union scores 0 (not NaN, not skipped)
    assert mask_iou(None, np.ones((4, 4), dtype=bool)) == 0.0  # no mask produced
    gt_255 = np.zeros((2, 2), dtype=np.uint8)
    gt_255[0, 0] = 255  # stored masks: pixel >= 1 is foreground
    assert mask_iou(np.array([[1, 0], [0, 0]]), gt_255) == 1.0
    with pytest.raises(ValueError, match="binar"):
        mask_iou(np.array([[0.3, 2.0], [0.0, 1.0]]), gt_255)  # logits passed by mistake
    with pytest.raises(ValueError, match="shape"):
        mask_iou(np.ones((2, 3), dtype=bool), gt_255)


def test_dice_from_iou():
    assert dice_from_iou(0.0) == 0.0
    assert dice_from_iou(1.0) == 1.0
    assert dice_from_iou(0.5) == pytest.approx(2 / 3)


def test_segmentation_scores_per_modality():
    a = np.array([[1, 1], [0, 0]], dtype=bool)
    corner = np.array([[1, 0], [0, 0]], dtype=bool)
    full = np.ones((2, 2), dtype=bool)
    empty = np.zeros((2, 2), dtype=bool)
    preds = [a, None, full, empty]
    gts = [corner, corner, full, empty]
    modalities = ["CT", "CT", "MRI", "MRI"]
    # IoU: 1/2 (inter 1, union 2), 0 (no mask), 1, 0 (empty union)
    # Dice: 2/3, 0, 1, 0
    out = segmentation_scores(preds, gts, modalities)
    assert out["count"] == 4
    assert out["miou"] == pytest.approx(0.375)
    assert out["mdice"] == pytest.approx(5 / 12)  # mean of per-image Dice, not Dice of mIoU
    assert out["mdice"] != pytest.approx(dice_from_iou(out["miou"]))
    assert out["miou/CT"] == pytest.approx(0.25)
    assert out["mdice/CT"] == pytest.approx(1 / 3)
    assert out["miou/MRI"] == pytest.approx(0.5)
    assert out["mdice/MRI"] == pytest.approx(0.5)
    assert out["count/CT"] == 2 and out["count/MRI"] == 2


def test_segmentation_scores_random_against_numpy():
    rng = np.random.default_rng(1)
    preds, gts, mods = [], [], []
    for i in range(60):
        shape = tuple(rng.integers(3, 20, size=2))
        gts.append(rng.random(shape) < 0.3)
        logits = torch.from_numpy(rng.normal(size=shape))
        preds.append(None if i % 10 == 0 else binarize(logits, 0.1))
        mods.append(["CT", "MRI", "X-ray"][i % 3])
    ious = np.array([0.0 if p is None else _np_iou(p.numpy(), g) for p, g in zip(preds, gts, strict=True)])
    dices = 2 * ious / (1 + ious)
    out = segmentation_scores(preds, gts, mods)
    assert out["miou"] == pytest.approx(ious.mean(), abs=1e-12)
    assert out["mdice"] == pytest.approx(dices.mean(), abs=1e-12)
    for k, mod in enumerate(["CT", "MRI", "X-ray"]):
        assert out[f"miou/{mod}"] == pytest.approx(ious[k::3].mean(), abs=1e-12)
        assert out[f"mdice/{mod}"] == pytest.approx(dices[k::3].mean(), abs=1e-12)


def test_segmentation_scores_errors():
    gt = np.ones((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="index 1"):
        segmentation_scores([gt, np.ones((8, 8), dtype=bool)], [gt, gt])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        segmentation_scores([gt, gt], [gt])
    with pytest.raises(ValueError, match="modalities"):
        segmentation_scores([gt], [gt], ["CT", "MRI"])
    assert segmentation_scores([], []) == {"count": 0.0}
