"""Checks every reader shares: JSON loading, required fields, paths that stay inside the root."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datamodules.problems import DataError, ProblemLog


def load_json_list(path: Path) -> list[Any]:
    """Load a JSON list; malformed JSON or another top-level type is an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def require_fields(item: Any, fields: tuple[str, ...], path: Path, index: int,
                   problems: ProblemLog) -> bool:
    """True when ``item`` is a dict with every field; otherwise report (or raise) and return False."""
    if not isinstance(item, dict):
        problems.report(path, index, "<record>", f"expected an object, got {type(item).__name__}",
                        "not_an_object")
        return False
    for name in fields:
        if name not in item or item[name] is None:
            problems.report(path, index, name, "missing field", "missing_field")
            return False
    return True


def resolve_inside(root: Path, relative: str, path: Path, record: object, field_name: str,
                   problems: ProblemLog, check_exists: bool = True) -> Path | None:
    """``root / relative`` if it stays inside ``root`` (and exists); otherwise report and None."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        problems.report(path, record, field_name, f"path {relative!r} escapes the dataset root {root}",
                        "path_escapes_root")
        return None
    if check_exists and not candidate.is_file():
        problems.report(path, record, field_name, f"file not found: {candidate}", "missing_image")
        return None
    return candidate
