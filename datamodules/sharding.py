"""Who am I in a distributed run (de-duplicating what the ranks produced: :func:`medcore.ids.dedupe_by_id`)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["world_of"]


def world_of(trainer: Any = None) -> tuple[int, int]:
    """(world_size, global_rank): the attached trainer's, else torch.distributed's, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0
