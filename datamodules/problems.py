"""Bad-record handling: raise with file, record and field, or skip and count per reason.

Record-level problems (a missing field, an empty answer, a missing image...) follow the policy:
``error`` raises :class:`DataError`, ``skip`` drops the record and counts it under its ``kind``.
File-level problems (malformed JSON, a missing split file, a refused pickle) always raise: the
whole file is unreadable, and dropping it would lose a split without a trace. Records a configuration
leaves out on purpose (SLAKE's other languages, ``max_samples``) are no problems, but they are counted too
(:meth:`ProblemLog.filter`), so nothing leaves a split without a number saying why.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

OnBadRecord = Literal["error", "skip"]  # skip: drop the record, count it under its kind
ON_BAD_RECORD: tuple[str, ...] = get_args(OnBadRecord)
FILE_LEVEL = "-"  # the ``record`` of a problem that concerns a whole file

log = logging.getLogger(__name__)


@dataclass
class Problem:
    file: str
    record: str  # index, id, or FILE_LEVEL
    field: str
    reason: str
    kind: str = "bad_record"  # the count key, e.g. missing_image, empty_answer

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: field '{self.field}': {self.reason}"

    def as_dict(self) -> dict[str, str]:
        """The ``medpipe data check --json`` shape: file, record, field, reason (kind first)."""
        return {"file": self.file, "record": self.record, "field": self.field, "reason": f"{self.kind}: {self.reason}"}


class DataError(ValueError):
    """A dataset file or record is malformed; the message names file, record and field."""

    def __init__(self, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.problem = problem


def file_error(file: object, field_name: str, reason: str, kind: str) -> DataError:
    """A :class:`DataError` about a whole file (no record to skip)."""
    problem = Problem(str(file), FILE_LEVEL, field_name, reason, kind)
    return DataError(str(problem), problem)


@dataclass
class ProblemLog:
    """Collects problems under one policy; ``skip`` keeps them (and counts per kind)."""

    on_bad_record: str = "error"
    problems: list[Problem] = field(default_factory=list)
    # records left out by configuration, not by a problem: "<file>: <reason>" -> count
    filtered: Counter = field(default_factory=Counter)
    _seen: set = field(default_factory=set, repr=False, init=False)

    def __post_init__(self) -> None:
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}")

    def report(self, file: str, record: object, field_name: str, reason: str, kind: str) -> None:
        """Raise under ``error``; under ``skip`` remember the problem. ``kind`` is the count key."""
        problem = Problem(str(file), str(record), field_name, reason, kind)
        if self.on_bad_record == "error":
            raise DataError(f"{problem} (set data.on_bad_record=skip to skip such records)", problem)
        key = (problem.file, problem.record, problem.field, problem.kind)
        if key not in self._seen:  # a file read for two splits reports its bad records once
            self._seen.add(key)
            self.problems.append(problem)

    def filter(self, file: object, reason: str, count: int = 1) -> None:
        """Count ``count`` records of ``file`` left out by configuration (``reason`` says which setting)."""
        if count:
            self.filtered[f"{file}: {reason}"] += count

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        if not self.problems:
            return "no records skipped"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
        return f"skipped {len(self.problems)} records ({parts})"

    def warn(self, context: str) -> None:
        """Print the skip counts (a logging warning) and the first few problems in full."""
        if not self.problems:
            return
        log.warning("%s: %s", context, self.summary())
        for problem in self.problems[:5]:
            log.warning("  %s [%s]", problem, problem.kind)
        if len(self.problems) > 5:
            log.warning("  ... and %d more (medpipe data check lists them all)", len(self.problems) - 5)
