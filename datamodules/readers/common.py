"""Checks every reader shares: JSON loading, required fields, answer types, paths inside the root."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from datamodules.problems import FILE_LEVEL, DataError, Problem, ProblemLog, file_error
from datamodules.records import closed_if_yes_no

# Annotation files are a few MB (SLAKE's train.json: 14k records); a file past this is not an annotation
# list, and json.load would hold ~10x its size in Python objects.
MAX_JSON_BYTES = 512 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_TOP_LEVEL = {"{": "object", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}

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


def load_json_list(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> list[Any]:
    """The elements of the JSON list in ``path``.

    A missing, oversized, non-UTF-8 or malformed file, or another top-level type, is a one-line
    :class:`DataError` naming the file (and, for malformed JSON, the list element and json's line
    and column).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise file_error(path, "<file>", "file not found", "missing_file") from None
    if size > max_bytes:
        reason = f"{size >> 20} MiB is more than an annotation file's limit of {max_bytes >> 20} MiB"
        raise file_error(path, "<json>", reason, "file_too_large")
    try:
        text = path.read_text(encoding="utf-8-sig")  # files saved by Windows tools may start with a BOM
    except UnicodeDecodeError as e:
        raise file_error(path, "<json>", f"not UTF-8 text ({e.reason})", "malformed_json") from None
    first = text[_WHITESPACE.match(text).end() :][:1]
    if first != "[":
        kind = (
            "an empty file"
            if not first
            else _TOP_LEVEL.get(first, "a number" if first in "-0123456789" else repr(first))
        )
        raise file_error(path, "<json>", f"expected a JSON list of records, got {kind}", "malformed_json")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        record = _element_at_error(text)
        reason = f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        problem = Problem(str(path), FILE_LEVEL if record is None else str(record), "<json>", reason, "malformed_json")
        raise DataError(str(problem), problem) from None


def _element_at_error(text: str) -> int | None:
    """Index of the list element a malformed list breaks in (None: after the list's end)."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return None
    index = 0
    while True:
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return index
        pos = _WHITESPACE.match(text, end).end()
        if not text.startswith(",", pos):
            return None if text.startswith("]", pos) else index
        pos = _WHITESPACE.match(text, pos + 1).end()
        index += 1


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
