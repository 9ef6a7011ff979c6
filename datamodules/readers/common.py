"""Checks every reader shares: JSON loading, typed fields, answer types, paths inside the root."""

from __future__ import annotations

import json
import math
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


MISSING: Any = object()  # the value of a key the record does not have
_READ = object()  # Fields.text's default: read the value from the record


def json_type(value: Any) -> str:
    """How a message names a value's type, in JSON's words (a Python bool is an int, NaN a float)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, float) and not math.isfinite(value):
        return f"a non-finite number ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    return type(value).__name__


class Fields:
    """Typed access to one record's fields: the one place where a reader turns a value into a field.

    A field has one type. Anything else (a missing key, null, a list, an object, a boolean, NaN, an empty
    string) is reported to the :class:`ProblemLog` naming file, record and field (raise under ``error``,
    count under ``skip``) and makes :attr:`ok` false. A record's first problem is its one reported problem
    (later accessors return None without reporting), so ``skip`` counts each dropped record once. Readers
    read every field through it, then keep the record only when ``ok``.
    """

    def __init__(self, item: Any, *, file: Path | str, record: str, problems: ProblemLog) -> None:
        self.item, self.file, self.record, self.problems = item, file, record, problems
        self.ok = True
        if not isinstance(item, dict):
            self.report("<record>", f"expected an object, got {json_type(item)}", "not_an_object")

    def report(self, field_name: str, reason: str, kind: str) -> None:
        """Report this record's (first) problem; the record is then dropped."""
        if self.ok:
            self.ok = False
            self.problems.report(self.file, self.record, field_name, reason, kind)

    def text(
        self,
        name: str,
        *,
        what: str = "text",
        numbers: bool = False,
        optional: bool = False,
        value: Any = _READ,
        empty: str | None = None,
    ) -> str | None:
        """Field ``name`` as a stripped, non-empty string (``value``: given instead of read from the record, e.g.
        a message inside a list, and reported as ``name``). ``numbers``: an integer is its decimal text (VQA-RAD
        writes counts as JSON numbers; most releases' ids are numbers). ``optional``: absent or null is None
        without a problem. Reports ``missing_field`` (absent or null), ``wrong_type`` or ``empty_<what>`` (``empty``:
        its reason, default "empty <what>")."""
        if not self.ok:
            return None
        if value is _READ:
            value = self.item.get(name, MISSING)
        expected = "a string or an integer" if numbers else "a string"
        if value is MISSING or value is None:
            if not optional:
                reason = "missing field" if value is MISSING else f"null (expected {expected})"
                self.report(name, reason, "missing_field")
            return None
        if numbers and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.report(name, f"expected {expected}, got {json_type(value)}", "wrong_type")
            return None
        text = value.strip()
        if not text:
            self.report(name, empty or f"empty {what}", f"empty_{what}")
            return None
        return text

    def ident(self, name: str, *, optional: bool = False) -> str | None:
        """A record id: a non-empty string or an integer (not a boolean, a float or a list)."""
        return self.text(name, what="id", numbers=True, optional=optional)


def answer_type_of(
    fields: Fields, answer: str, *, name: str = "answer_type", required: bool = False, yes_no_closes: bool = False
) -> str | None:
    """``closed``/``open`` from the record's answer type field (any known spelling, any case); from the answer
    (yes/no -> closed) when the field is absent or null and not ``required``. ``yes_no_closes``: a yes/no answer
    is closed whatever the field says (the hub exports, PathVQA). None after reporting a bad or unknown value."""
    raw = fields.text(name, what="answer_type", optional=not required)
    if not fields.ok:
        return None
    if raw is None:
        return closed_if_yes_no(answer)
    kind = ANSWER_TYPE_ALIASES.get(raw.lower())
    if kind is None:
        fields.report(name, f"unknown answer_type {raw!r} (expected OPEN or CLOSED)", "unknown_answer_type")
        return None
    if yes_no_closes and closed_if_yes_no(answer) == "closed":
        return "closed"
    return kind


def language_key(language: str) -> str:
    """How languages compare: case and surrounding spaces do not matter ("EN" is "en")."""
    return language.strip().casefold()


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
