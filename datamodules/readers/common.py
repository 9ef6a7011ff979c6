"""Checks every reader shares: JSON loading, required fields, answer types, paths inside the root."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from datamodules.problems import ProblemLog
from datamodules.readers.json_stream import iter_json_list
from datamodules.records import closed_if_yes_no

# answer_type spellings across the releases -> ours
ANSWER_TYPE_ALIASES = {
    "open": "open",
    "closed": "closed",
    "close": "closed",
    "yes/no": "closed",
    "other": "open",
    "number": "open",
}


def record_label(index: int, rid: object | None = None) -> str:
    """How problems name a record: its position in the file, and its id when it has one."""
    return str(index) if rid is None else f"{index} (id {rid})"


def load_json_list(path: Path) -> list[Any]:
    """Load a JSON list; malformed JSON or another top-level type is an error naming the file."""
    return list(iter_json_list(path))


def require_fields(item: Any, fields: tuple[str, ...], path: Path, record: str, problems: ProblemLog) -> bool:
    """True when ``item`` is a dict with every field; otherwise report (or raise) and return False."""
    if not isinstance(item, dict):
        problems.report(path, record, "<record>", f"expected an object, got {type(item).__name__}", "not_an_object")
        return False
    for name in fields:
        if name not in item or item[name] is None:
            problems.report(path, record, name, "missing field", "missing_field")
            return False
    return True


def answer_type_of(
    raw: Any, answer: str, path: Path, record: str, problems: ProblemLog, field_name: str = "answer_type"
) -> str | None:
    """``closed``/``open`` from a release's answer_type (any known spelling, stripped, any case);
    from the answer (yes/no -> closed) when the release has none; None (reported) when unknown."""
    if raw is None:
        return closed_if_yes_no(answer)
    kind = ANSWER_TYPE_ALIASES.get(str(raw).strip().lower())
    if kind is None:
        problems.report(
            path, record, field_name, f"unknown answer_type {raw!r} (expected OPEN or CLOSED)", "unknown_answer_type"
        )
    return kind


def shared(value: Any) -> Any:
    """One string object per distinct categorical value (modality, location...): JSON parsing
    makes a new string per record, and an indexed 100k-record split keeps them all."""
    return sys.intern(value) if isinstance(value, str) else value


def inside(root: Path, relative: str) -> str | None:
    """``root/relative`` normalised, or None when the path as written leaves ``root``.

    The check is lexical (``..`` and absolute paths escape): symlinks inside the dataset folder are
    followed, since users often link an image folder that lives elsewhere.
    """
    base = os.path.normpath(str(root))
    joined = os.path.normpath(os.path.join(base, relative))
    if joined != base and not joined.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return joined


class PathResolver:
    """Resolves a dataset's relative paths, once per distinct path.

    Many records share an image (SLAKE: 14k questions over 642 images), so the existence check
    (one ``stat``, only when ``check_exists``) and the path string are shared between them.
    """

    def __init__(self, root: Path, *, check_exists: bool) -> None:
        self.root = Path(root)
        self.check_exists = check_exists
        self._seen: dict[str, tuple[str, str]] = {}  # relative -> (joined path, status)

    def resolve(
        self,
        relative: str,
        *,
        file: Path,
        record: str,
        field_name: str,
        problems: ProblemLog,
        missing_kind: str = "missing_image",
    ) -> str | None:
        """The resolved path, or None after reporting why (escapes the root, or missing)."""
        found = self._seen.get(relative)
        if found is None:
            joined = inside(self.root, relative)
            if joined is None:
                found = ("", "escapes")
            elif self.check_exists and not os.path.isfile(joined):
                found = (joined, "missing")
            else:
                found = (joined, "ok")
            self._seen[relative] = found
        joined, status = found
        if status == "escapes":
            problems.report(
                file, record, field_name, f"path {relative!r} escapes the dataset root {self.root}", "path_escapes_root"
            )
            return None
        if status == "missing":
            problems.report(file, record, field_name, f"file not found: {joined}", missing_kind)
            return None
        return joined
