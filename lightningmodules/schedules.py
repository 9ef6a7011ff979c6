"""Learning-rate schedules as multipliers of the base rate (no heavy imports: the config uses it)."""

from __future__ import annotations

import math

from medcore.choices import SCHEDULERS


def lr_lambda(step: int, *, total_steps: int, warmup_steps: int, scheduler: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine / linear decay or constant."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
