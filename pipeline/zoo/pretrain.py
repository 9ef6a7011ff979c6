"""The one pretraining loop of the tiny models: AdamW under a warmup + cosine schedule on random batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn


def warmup_cosine(step: int, *, total: int, warmup: float = 0.05) -> float:
    """LR multiplier for the tiny models' pretraining: 5% linear warmup, then cosine to zero."""
    n_warm = max(1, int(total * warmup))
    if step < n_warm:
        return (step + 1) / n_warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def pretrain(
    parameters: Iterable[nn.Parameter],
    batch_loss: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    steps: int,
    n_items: int,
    batch_size: int,
    peak_lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    max_grad_norm: float | None = None,
) -> None:
    """``steps`` AdamW steps; step s draws ``batch_size`` item indices (a generator seeded with ``seed``) and
    minimises ``batch_loss(indices, s)``. The caller puts its modules in train / eval mode."""
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, total=steps))
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = torch.randint(0, n_items, (batch_size,), generator=generator)
        loss = batch_loss(indices, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        schedule.step()
