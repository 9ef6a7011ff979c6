"""Mask losses for pixel grounding (LISA / MedPLIB): BCE + Dice (+ focal), per mask at its own resolution.

Each component is computed per mask (over that mask's pixels) and then averaged over the masks of
the batch - LISA and MedPLIB normalise by the number of masks. Masks have different sizes (each is
scored at its image's original resolution), so they arrive as lists.

- BCE: ``F.binary_cross_entropy_with_logits``, mean over the mask's pixels (MONAI has no plain BCE).
- Dice: MONAI ``DiceLoss(sigmoid=True, smooth_nr=eps, smooth_dr=eps)`` on each (1, 1, H, W) mask:
  ``1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)`` with p = sigmoid(logit) - exactly MedPLIB's
  ``dice_loss`` with its eps = 1e-6 (LISA's variant divides p and t by 1000 first, which only makes
  its eps relatively larger).
- Focal (optional): MONAI ``FocalLoss(use_softmax=False, gamma, alpha)``, the sigmoid focal loss
  ``-alpha_t (1 - p_t)^gamma log p_t`` averaged over pixels, as MedPLIB's ``FocalLoss`` (alpha 0.25).
  It only runs when ``focal_weight > 0``; otherwise the reported ``focal`` is 0.

The caller passes only the masks that have a target (a batch that mixes samples with and without
masks drops the latter before calling). With no masks at all the loss is 0 but still has a grad_fn:
pass ``zero`` (e.g. ``GroundingHead.zero_loss()``) so DDP also sees the decoder's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DICE_EPS = 1e-6  # MedPLIB's dice_loss eps
FOCAL_ALPHA = 0.25  # MedPLIB's FocalLoss default (RetinaNet's)


def _dice_loss_fn(eps: float):
    from monai.losses import DiceLoss

    return DiceLoss(sigmoid=True, smooth_nr=eps, smooth_dr=eps, reduction="mean")


def _focal_loss_fn(gamma: float, alpha: float | None):
    from monai.losses import FocalLoss

    return FocalLoss(use_softmax=False, gamma=gamma, alpha=alpha, reduction="mean")


def mask_losses(
    logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    bce_weight: float,
    dice_weight: float,
    focal_weight: float = 0.0,
    focal_gamma: float = 2.0,
    focal_alpha: float | None = FOCAL_ALPHA,
    dice_eps: float = DICE_EPS,
    zero: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``loss`` (weighted sum) and the unweighted ``bce``, ``dice``, ``focal`` means over masks.

    ``logits[i]`` and ``targets[i]`` are (H_i, W_i): mask logits and the bool (or 0/1) target at the
    same resolution. ``zero`` is returned (times 0) for every entry when there are no masks; without
    it the zero loss hangs off a fresh leaf tensor.
    """
    if len(logits) != len(targets):
        raise ValueError(f"{len(logits)} predicted masks but {len(targets)} targets")
    if not logits:
        base = zero * 0.0 if zero is not None else torch.zeros((), requires_grad=True) * 0.0
        return {"loss": base, "bce": base.detach(), "dice": base.detach(), "focal": base.detach()}
    dice_fn = _dice_loss_fn(dice_eps)
    focal_fn = _focal_loss_fn(focal_gamma, focal_alpha) if focal_weight > 0 else None
    bce_terms, dice_terms, focal_terms = [], [], []
    for index, (logit, target) in enumerate(zip(logits, targets, strict=True)):
        if logit.shape != target.shape:
            raise ValueError(
                f"mask {index}: logits {tuple(logit.shape)} but target {tuple(target.shape)}; "
                "score masks at the target's (original) resolution"
            )
        logit = logit.float()[None, None]  # (1, 1, H, W)
        target = target.to(logit.dtype)[None, None]  # (1, 1, H, W)
        bce_terms.append(F.binary_cross_entropy_with_logits(logit, target))
        dice_terms.append(dice_fn(logit, target))
        if focal_fn is not None:
            focal_terms.append(focal_fn(logit, target))
    bce = torch.stack(bce_terms).mean()
    dice = torch.stack(dice_terms).mean()
    focal = torch.stack(focal_terms).mean() if focal_terms else torch.zeros((), device=bce.device)
    loss = bce_weight * bce + dice_weight * dice + (focal_weight * focal if focal_terms else 0.0)
    return {"loss": loss, "bce": bce, "dice": dice, "focal": focal}
