"""Pair predictions with references by id, never by position."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class PairingError(ValueError):
    """Missing, duplicate or unknown ids between a prediction file and its references."""


@dataclass
class Reference:
    """What a prediction is scored against."""

    id: str
    answer: str
    answer_type: str  # closed | open
    task: str = "vqa"
    modality: str | None = None
    dataset: str | None = None
    question: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pair:
    reference: Reference
    prediction: str


def _preview(ids: Iterable[str], limit: int = 5) -> str:
    ids = sorted(map(str, ids))
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def pair_by_id(predictions: Mapping[str, str] | list[tuple[str, str]], references: list[Reference]) -> list[Pair]:
    """One pair per reference; a reference without a prediction, a duplicate prediction id, or a
    prediction whose id no reference has is an error naming the ids."""
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    else:
        items = [(str(i), t) for i, t in predictions]
    counts = Counter(i for i, _ in items)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        raise PairingError(f"{len(duplicates)} prediction ids occur more than once: {_preview(duplicates)}")
    ref_counts = Counter(r.id for r in references)
    dup_refs = [i for i, n in ref_counts.items() if n > 1]
    if dup_refs:
        raise PairingError(f"{len(dup_refs)} reference ids occur more than once: {_preview(dup_refs)}")
    by_id = dict(items)
    missing = [r.id for r in references if r.id not in by_id]
    unknown = set(by_id) - set(ref_counts)
    if missing:
        raise PairingError(f"{len(missing)} of {len(references)} references have no prediction: {_preview(missing)}")
    if unknown:
        raise PairingError(f"{len(unknown)} predictions match no reference id: {_preview(unknown)}")
    return [Pair(reference=r, prediction=str(by_id[r.id])) for r in references]
