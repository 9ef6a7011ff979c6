"""The one optimiser every stage LightningModule uses: AdamW (no decay on biases and norms) + LR schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightningmodules.schedules import lr_lambda


def build_optimizer(
    parameters: Iterable[nn.Parameter],
    *,
    total_steps: int,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_ratio: float,
    scheduler: str,
    min_lr_ratio: float,
    empty_message: str = "no trainable parameters: check the stage's `train` groups",
) -> dict[str, Any]:
    """AdamW over the trainable ``parameters`` with a per-step warmup + decay schedule, in the form
    Lightning's ``configure_optimizers`` returns."""
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)  # biases and norms: no decay
    if not decay and not no_decay:
        raise RuntimeError(empty_message)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=tuple(betas),
    )
    total = max(1, int(total_steps))
    warmup = int(math.ceil(warmup_ratio * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step, total_steps=total, warmup_steps=warmup, scheduler=scheduler, min_lr_ratio=min_lr_ratio
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def configure_from_hparams(module: Any, parameters: Iterable[nn.Parameter], **kwargs: Any) -> dict[str, Any]:
    """``build_optimizer`` with a LightningModule's saved ``lr``, ``weight_decay``, ``betas``, ``warmup_ratio``,
    ``scheduler`` and ``min_lr_ratio`` hyperparameters and its trainer's step count."""
    hp = module.hparams
    return build_optimizer(
        parameters,
        total_steps=module.trainer.estimated_stepping_batches,
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        betas=tuple(hp.betas),
        warmup_ratio=hp.warmup_ratio,
        scheduler=hp.scheduler,
        min_lr_ratio=hp.min_lr_ratio,
        **kwargs,
    )
