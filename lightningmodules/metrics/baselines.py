"""Answer-prior baselines a model must beat to show it looks at the image."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Protocol


class _QA(Protocol):
    question: str
    answer: str


def majority_answers(train: Iterable[_QA]) -> tuple[dict[str, str], str]:
    """Most frequent training answer per question text, and overall (for unseen questions)."""
    per_question: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for r in train:
        per_question[r.question.strip().lower()][r.answer] += 1
        overall[r.answer] += 1
    if not overall:
        raise ValueError("majority baseline needs at least one training record")
    table = {q: c.most_common(1)[0][0] for q, c in per_question.items()}
    return table, overall.most_common(1)[0][0]


def majority_predictions(train: Iterable[_QA], test: Iterable[_QA]) -> list[str]:
    table, fallback = majority_answers(train)
    return [table.get(r.question.strip().lower(), fallback) for r in test]
