"""The one optimiser every stage LightningModule uses: AdamW (no decay on biases and norms) + LR schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightningmodules.schedules import lr_lambda

log = logging.getLogger("medpipe")


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
    warmup_steps: int | None = None,
    warmup_start_ratio: float = 0.0,
    decay_from: str = "warmup_end",
    empty_message: str = "no trainable parameters: check the stage's `train` groups",
) -> dict[str, Any]:
    """AdamW over the trainable ``parameters`` with a per-step warmup + decay schedule, in the form
    Lightning's ``configure_optimizers`` returns. The warmup lasts ``warmup_steps`` optimiser steps when
    given, else ``ceil(warmup_ratio * total_steps)``; the schedule: :func:`lightningmodules.schedules.lr_lambda`."""
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
    warmup = int(warmup_steps) if warmup_steps is not None else int(math.ceil(warmup_ratio * total))
    if warmup_steps is not None and warmup >= total:
        log.warning("warmup_steps %d: the warmup does not end within the run's %d steps", warmup, total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(
            step,
            total_steps=total,
            warmup_steps=warmup,
            scheduler=scheduler,
            min_lr_ratio=min_lr_ratio,
            warmup_start_ratio=warmup_start_ratio,
            decay_from=decay_from,
        ),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def configure_from_hparams(module: Any, parameters: Iterable[nn.Parameter], **kwargs: Any) -> dict[str, Any]:
    """``build_optimizer`` with a LightningModule's saved ``lr``, ``weight_decay``, ``betas``, ``warmup_ratio``,
    ``scheduler``, ``min_lr_ratio``, ``warmup_steps``, ``warmup_start_ratio`` and ``decay_from``
    hyperparameters (the last three: their defaults when a module does not save them) and its trainer's step
    count."""
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
        warmup_steps=hp.get("warmup_steps"),
        warmup_start_ratio=hp.get("warmup_start_ratio", 0.0),
        decay_from=hp.get("decay_from", "warmup_end"),
        **kwargs,
    )
