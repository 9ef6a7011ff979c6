"""De-duplication by id: the one helper for what DDP's padded evaluation sampler repeats."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["dedupe_by_id", "id_of"]


def id_of(item: Any, key: str = "question_id") -> str:
    """An item's id as a string: a mapping's ``key`` (else its ``id``), or an object's ``id`` (records)."""
    if isinstance(item, Mapping):
        return str(item[key] if key in item else item["id"])
    return str(item.id)


def dedupe_by_id(items: Iterable[Any], key: str = "question_id") -> list[Any]:
    """The first item per id, in order (ids compare as strings).

    Lightning's DistributedSampler pads evaluation sets so every rank gets the same number of
    samples; the padding repeats samples, so gathered predictions hold some ids twice. Items are
    mappings (``key``, else ``id``) or objects with an ``id`` (records).
    """
    seen: set[str] = set()
    kept = []
    for item in items:
        rid = id_of(item, key)
        if rid not in seen:
            seen.add(rid)
            kept.append(item)
    return kept
