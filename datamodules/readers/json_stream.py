"""Stream the elements of a top-level JSON list, one at a time, from a bounded text buffer.

``json.load`` of a 100k-record annotation file holds the whole text and every parsed dict at
once (~1.5 kB per SLAKE record) before a reader can turn them into compact records. Decoding one
element at a time with ``JSONDecoder.raw_decode`` keeps the peak at the records plus a buffer of a
few MB. Errors name the file with the line and column, as ``json`` would.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from datamodules.problems import FILE_LEVEL, DataError, Problem, file_error

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_TOP_LEVEL = {"{": "object", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}


class _Buffer:
    """A window on the file's text; ``text[pos:]`` is what is not consumed yet."""

    def __init__(self, f: TextIO, path: Path, chunk_chars: int) -> None:
        self.f = f
        self.path = path
        self.chunk_chars = chunk_chars
        self.text = ""
        self.pos = 0
        self.eof = False
        self.lines_before = 0  # newlines in the text already dropped from the window
        self.column_before = 0  # characters of the window's first line that were dropped

    def fill(self) -> None:
        # read at least as much as is pending: a value longer than the window doubles it, so even
        # a broken file (read to its end before the error is certain) costs linear time
        chunk = self.f.read(max(self.chunk_chars, len(self.text) - self.pos))
        if not chunk:
            self.eof = True
            return
        dropped = self.text[: self.pos]
        self.lines_before += dropped.count("\n")
        last = dropped.rfind("\n")
        self.column_before = len(dropped) - last - 1 if last >= 0 else self.column_before + len(dropped)
        self.text = self.text[self.pos :] + chunk
        self.pos = 0

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.fill()

    def decode(self, decoder: json.JSONDecoder, index: int) -> Any:
        """The next JSON value; reads more text while the value is cut by the window's end."""
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.malformed(e.msg, e.pos, record=index) from None
                self.fill()
                continue
            after = _WHITESPACE.match(self.text, end).end()
            if not self.eof and (after == len(self.text) or self.text[after] not in ",]"):
                # a number cut by the window's end ("2." of "2.5") decodes too early: read on until
                # a delimiter follows the value (or the file ends and the caller reports it)
                self.fill()
                continue
            self.pos = end
            return value

    def malformed(self, message: str, pos: int, record: int | None = None) -> DataError:
        """A malformed-JSON error at ``pos``, naming the list element being read when known."""
        line = self.lines_before + self.text.count("\n", 0, pos) + 1
        last = self.text.rfind("\n", 0, pos)
        column = pos - last if last >= 0 else self.column_before + pos + 1
        problem = Problem(
            str(self.path),
            FILE_LEVEL if record is None else str(record),
            "<json>",
            f"malformed JSON at line {line} column {column}: {message}",
            "malformed_json",
        )
        return DataError(str(problem), problem)


def iter_json_list(path: Path, *, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of the JSON list in ``path``; a malformed file raises a DataError."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8-sig")  # files saved by Windows tools may start with a BOM
    except FileNotFoundError:
        raise file_error(path, "<file>", "file not found", "missing_file") from None
    decoder = json.JSONDecoder()
    with f:
        buf = _Buffer(f, path, chunk_chars)
        try:
            first = buf.peek()
            if first != "[":
                kind = (
                    "an empty file"
                    if not first
                    else _TOP_LEVEL.get(first, "a number" if first in "-0123456789" else f"{first!r}")
                )
                raise file_error(path, "<json>", f"expected a JSON list of records, got {kind}", "malformed_json")
            buf.pos += 1
            if buf.peek() == "]":
                buf.pos += 1
            else:
                for index in itertools.count():
                    buf.peek()  # a value starts at the next non-whitespace character
                    yield buf.decode(decoder, index)
                    after = buf.peek()
                    buf.pos += 1
                    if after == "]":
                        break
                    if after != ",":
                        raise buf.malformed(
                            "Expecting ',' delimiter" if after else "Unexpected end of file", buf.pos - 1, record=index
                        )
            if buf.peek():
                raise buf.malformed("Extra data", buf.pos)
        except UnicodeDecodeError as e:
            raise file_error(path, "<json>", f"not UTF-8 text ({e.reason})", "malformed_json") from None
