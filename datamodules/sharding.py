"""Who am I in a distributed run, and de-duplicating what the ranks produced."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def world_of(trainer: Any = None) -> tuple[int, int]:
    """(world_size, global_rank): the attached trainer's, else torch.distributed's, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _id_of(item: Any, key: str) -> str:
    if isinstance(item, dict):
        return str(item[key] if key in item else item["id"])
    return str(item.id)


def dedupe_by_id(predictions: Iterable[Any], key: str = "question_id") -> list[Any]:
    """The first prediction per id, in order.

    Lightning's DistributedSampler pads evaluation sets so every rank gets the same number of
    samples; the padding repeats samples, so gathered predictions hold some ids twice. Items are
    dicts (``key``, else ``id``) or objects with an ``id`` (records).
    """
    seen: set[str] = set()
    kept = []
    for item in predictions:
        rid = _id_of(item, key)
        if rid not in seen:
            seen.add(rid)
            kept.append(item)
    return kept
