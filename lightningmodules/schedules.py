"""Learning-rate schedules as multipliers of the base rate (no heavy imports: the config uses it)."""

from __future__ import annotations

import math

from medcore.choices import DECAY_FROM, SCHEDULERS


def lr_lambda(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    scheduler: str,
    min_lr_ratio: float,
    warmup_start_ratio: float = 0.0,
    decay_from: str = "warmup_end",
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based; called once per step).

    Warmup (``step < warmup_steps``), linear:

    - ``warmup_start_ratio == 0``: ``(step + 1) / warmup_steps``; the first step already moves (lr / warmup)
      and the last warmup step runs at the full rate.
    - ``warmup_start_ratio = s > 0``: ``s + (1 - s) * step / warmup_steps``, LAVIS's ``warmup_lr_schedule``
      (Uni-Med: 1e-6 -> 1e-5 is s = 0.1): the first step at exactly ``s * lr``, the full rate reached at step
      ``warmup_steps``, where the decay takes over.

    Then ``cosine`` / ``linear`` decay from 1 to ``min_lr_ratio``, or ``constant`` 1. The decay's progress is
    ``(step - warmup_steps) / (total_steps - warmup_steps)`` with ``decay_from="warmup_end"``, or
    ``step / total_steps`` with ``decay_from="start"`` (LAVIS's ``linear_warmup_cosine_lr``: the warmup steps
    count, so the cosine starts part-way, at ``warmup_steps / total_steps``); clamped to 1 past the end.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if decay_from not in DECAY_FROM:
        raise ValueError(f"decay_from must be one of {DECAY_FROM}, got {decay_from!r}")
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_start_ratio > 0:
            return warmup_start_ratio + (1.0 - warmup_start_ratio) * step / warmup_steps
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    if decay_from == "start":
        progress = min(1.0, step / max(1, total_steps))
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay
