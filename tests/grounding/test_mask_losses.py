"""mask_losses against values computed by hand, and batches without masks."""

from __future__ import annotations

import math

import pytest
import torch

from lightningmodules.losses import mask_losses

LOGITS = [torch.tensor([[2.0, -1.0], [0.0, 3.0]]), torch.tensor([[-2.0, 1.0, 0.5]])]  # a 2x2 and a 1x3 mask
TARGETS = [torch.tensor([[True, False], [True, False]]), torch.tensor([[False, True, True]])]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _hand_values(alpha: float = 0.25, gamma: float = 2.0, eps: float = 1e-6) -> dict[str, float]:
    bce, dice, focal = [], [], []
    for logits, target in zip(LOGITS, TARGETS, strict=True):
        xs, ts = logits.flatten().tolist(), [float(t) for t in target.flatten().tolist()]
        ps = [_sigmoid(x) for x in xs]
        bce.append(sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(ps, ts, strict=True)) / len(ps))
        intersection = sum(p * t for p, t in zip(ps, ts, strict=True))
        dice.append(1 - (2 * intersection + eps) / (sum(ps) + sum(ts) + eps))
        terms = []
        for p, t in zip(ps, ts, strict=True):
            p_t = p if t else 1 - p
            alpha_t = alpha if t else 1 - alpha
            terms.append(-alpha_t * (1 - p_t) ** gamma * math.log(p_t))
        focal.append(sum(terms) / len(terms))
    return {"bce": _mean(bce), "dice": _mean(dice), "focal": _mean(focal)}


def test_losses_match_hand_computation() -> None:
    hand = _hand_values()
    out = mask_losses(LOGITS, TARGETS, bce_weight=2.0, dice_weight=0.5, focal_weight=3.0)
    assert out["bce"].item() == pytest.approx(hand["bce"], rel=1e-5)
    assert out["dice"].item() == pytest.approx(hand["dice"], rel=1e-5)
    assert out["focal"].item() == pytest.approx(hand["focal"], rel=1e-5)
    expected = 2.0 * hand["bce"] + 0.5 * hand["dice"] + 3.0 * hand["focal"]
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_dice_is_medplib_dice_loss() -> None:
    """MONAI's DiceLoss with these settings is MedPLIB's dice_loss (eps 1e-6), mask by mask."""
    for logits, target in zip(LOGITS, TARGETS, strict=True):
        p, t = torch.sigmoid(logits).flatten(), target.float().flatten()
        medplib = 1 - (2 * (p * t).sum() + 1e-6) / (p.sum() + t.sum() + 1e-6)
        ours = mask_losses([logits], [target], bce_weight=0.0, dice_weight=1.0)["dice"]
        torch.testing.assert_close(ours, medplib)


def test_focal_off_by_default_and_gamma_zero_is_weighted_bce() -> None:
    out = mask_losses(LOGITS, TARGETS, bce_weight=1.0, dice_weight=1.0)
    assert out["focal"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["bce"].item() + out["dice"].item(), rel=1e-6)
    no_alpha = mask_losses(
        LOGITS, TARGETS, bce_weight=0.0, dice_weight=0.0, focal_weight=1.0, focal_gamma=0.0, focal_alpha=None
    )
    assert no_alpha["focal"].item() == pytest.approx(no_alpha["bce"].item(), rel=1e-6)


def test_gradients_flow_to_the_logits() -> None:
    logits = [x.clone().requires_grad_(True) for x in LOGITS]
    mask_losses(logits, TARGETS, bce_weight=1.0, dice_weight=1.0, focal_weight=1.0)["loss"].backward()
    assert all(x.grad is not None and float(x.grad.abs().sum()) > 0 for x in logits)


def test_no_masks_gives_zero_with_grad_fn() -> None:
    out = mask_losses([], [], bce_weight=1.0, dice_weight=1.0, focal_weight=1.0)
    assert out["loss"].item() == 0.0 and out["loss"].grad_fn is not None
    out["loss"].backward()
    assert out["bce"].item() == out["dice"].item() == out["focal"].item() == 0.0
    weight = torch.nn.Parameter(torch.ones(3))
    anchored = mask_losses([], [], bce_weight=1.0, dice_weight=1.0, zero=weight.sum())
    anchored["loss"].backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) == 0.0


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="original"):
        mask_losses([torch.zeros(2, 2)], [torch.zeros(3, 3, dtype=torch.bool)], bce_weight=1.0, dice_weight=1.0)
    with pytest.raises(ValueError, match="targets"):
        mask_losses([torch.zeros(2, 2)], [], bce_weight=1.0, dice_weight=1.0)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
