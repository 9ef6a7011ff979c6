"""Bad-record handling: raise with file, record and field, or skip and count per reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ON_BAD_RECORD = ("error", "skip")


class DataError(ValueError):
    """A dataset file or record is malformed; the message names file, record and field."""


@dataclass
class Problem:
    file: str
    record: str  # index or id
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: field '{self.field}': {self.reason}"


@dataclass
class ProblemLog:
    """Collects problems under one policy; ``skip`` keeps them (and counts per reason)."""

    on_bad_record: str = "error"
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}")

    def report(self, file: str, record: object, field_name: str, reason: str, kind: str) -> None:
        """Raise under ``error``; under ``skip`` remember the problem. ``kind`` is the count key."""
        problem = Problem(str(file), str(record), field_name, reason)
        if self.on_bad_record == "error":
            raise DataError(f"{problem} (set data.on_bad_record=skip to skip such records)")
        problem.reason = f"{kind}: {reason}"
        self.problems.append(problem)

    def counts(self) -> Counter:
        return Counter(p.reason.split(":", 1)[0] for p in self.problems)

    def summary(self) -> str:
        if not self.problems:
            return "no records skipped"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
        return f"skipped {len(self.problems)} records ({parts})"
