"""``medpipe score``: rescore a prediction file under every paper's protocol.

Predictions: JSONL (or a JSON list) with ``question_id`` and ``text`` — LLaVA-Med's format, which
Med-MoE and MedPLIB also write, and ours. References, detected from the file's content:

- conversation JSON (LLaVA-Med / Med-MoE / MedPLIB test files): ``id`` + first ``gpt`` answer;
- SLAKE split file (``qid``, ``answer``, ``answer_type``, ``q_lang``): English only unless asked;
- VQA-RAD release JSON (``qid``, ``phrase_type``): the test phrase types;
- a JSONL of our predictions, whose lines carry ``answer`` and ``answer_type``.

Ids are compared as strings; every reference needs exactly one prediction. The text report starts
with the table of the released script (repository, commit, file) each protocol follows
(``lightningmodules.metrics.protocols.PROTOCOL_SOURCES``, also printed by ``medpipe score --help``).

Every field has one type: ids are strings or integers, texts and answers strings (reference answers may
be numbers, as VQA-RAD's are); a null, a list, an object, a boolean or a NaN is never read as its Python
string form (a null prediction would become "None", which med_moe's substring rule scores as a correct
"no"). Such a record is a problem naming file, record and field: an error by default, or with
``--on-bad-record skip`` left out with its pair, counted and printed. Rows the released scripts do not
score (other SLAKE languages, matched case-insensitively; VQA-RAD's training phrases) are counted too, and
a file that is not UTF-8, not JSON or nested too deeply is one line naming it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.problems import DataError, Problem
from datamodules.readers.common import json_type
from datamodules.records import closed_if_yes_no
from lightningmodules.metrics.pairing import Reference, pair_by_id
from lightningmodules.metrics.protocols import PROTOCOLS, protocol_sources_markdown
from lightningmodules.metrics.report import evaluation_report, format_report

VQA_RAD_TEST_PHRASES = ("test_freeform", "test_para")
_ANSWER_TYPES = {"open": "open", "closed": "closed", "close": "closed", "yes/no": "closed", "other": "open"}
ON_BAD_RECORD = ("error", "skip")
ID_KEYS = ("qid", "id", "question_id")
REFERENCE_FORMATS = {
    "conversation": "conversation JSON",
    "vqa_rad": "VQA-RAD",
    "slake": "SLAKE",
    "predictions": "predictions-with-answers",
}

log = logging.getLogger("medpipe")


@dataclass
class ScoreProblems:
    """Bad records of the two files: ``error`` raises a :class:`DataError` naming file, record and field;
    ``skip`` keeps the problem (counted per kind, printed) and the record is left out of every metric."""

    on_bad_record: str = "error"
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD)}, got {self.on_bad_record!r}")

    def report(self, file: Path, record: str, field_name: str, reason: str, kind: str) -> None:
        problem = Problem(str(file), record, field_name, reason, kind)
        if self.on_bad_record == "error":
            raise DataError(f"{problem} (--on-bad-record skip leaves such records out, counted)", problem)
        self.problems.append(problem)

    def counts(self) -> Counter:
        return Counter(p.kind for p in self.problems)


class _Bad(Exception):
    """One record's problem, raised by the field readers and reported by the record loop."""

    def __init__(self, field_name: str, reason: str, kind: str = "wrong_type") -> None:
        super().__init__(reason)
        self.field, self.reason, self.kind = field_name, reason, kind


def _get(row: dict, key: str, *, required: bool = True) -> Any:
    if key not in row:
        if required:
            raise _Bad(key, "missing", "missing_field")
        return None
    return row[key]


def _text(row: dict, key: str, *, numbers: bool = False, empty: bool = True, required: bool = True) -> str | None:
    """A string field; ``numbers``: an int or a finite float is its decimal text (VQA-RAD's numeric answers).
    null, lists, objects, booleans and NaN are problems: never their Python string forms."""
    value = _get(row, key, required=required)
    if value is None and not required:
        return None
    if isinstance(value, str):
        if not empty and not value.strip():
            raise _Bad(key, "empty", "empty_field")
        return value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    expected = "a string or a number" if numbers else "a string"
    raise _Bad(key, f"expected {expected}, got {json_type(value)}")


def _optional_text(row: dict, key: str) -> str | None:
    """A metadata field (modality, dataset, task): absent or null is "not given"; another type a problem."""
    return _text(row, key, required=False)


def _identifier(row: dict, key: str) -> str:
    """An id: a non-empty string or an integer, compared as a string."""
    value = _get(row, key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, str):
        raise _Bad(key, "empty", "empty_field")
    raise _Bad(key, f"expected a string or an integer id, got {json_type(value)}")


def _numbers(row: dict, key: str, length: int) -> list[float] | None:
    value = row.get(key)
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == length
    if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return value
    raise _Bad(key, f"expected a list of {length} finite numbers, got {json_type(value)}")


def _read_json_or_jsonl(path: Path) -> list[Any]:
    """The rows of a JSON file (a list, or one object) or a JSONL file; a file that is not UTF-8, not JSON,
    or nested deeper than the parser goes is a :class:`DataError` naming it (and the line)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM is an encoding mark, not data
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels)") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(
                    f"{path}: line {number}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels)"
                ) from None
    return rows


def _record_label(index: int, row: Any, *keys: str) -> str:
    """``3`` (the position in the file) or ``3 (id 'a7')`` when the row's id field is readable."""
    if isinstance(row, dict):
        for key in keys:
            value = row.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
                return f"{index} (id {str(value)!r})"
    return str(index)


def _answer_type(row: dict, answer: str) -> str:
    raw = row.get("answer_type")
    if raw is None:  # absent or null: a release without the column, derived from the answer
        return closed_if_yes_no(answer)
    if not isinstance(raw, str):
        raise _Bad("answer_type", f"expected a string, got {json_type(raw)}")
    kind = _ANSWER_TYPES.get(raw.strip().lower())
    if kind is None:
        raise _Bad("answer_type", f"unknown answer_type {raw!r}", "unknown_value")
    return kind


def load_predictions(path: str | Path, problems: ScoreProblems | None = None) -> tuple[list[tuple[str, str]], set]:
    """(question id, text) of every prediction, and the ids of predictions skipped under ``skip`` (None
    stands for a skipped one whose id is unreadable). ``text`` must be a string: a null is a problem,
    never the string "None" (which the med_moe rule would score as a correct "no")."""
    path, problems = Path(path), problems or ScoreProblems()
    out, skipped = [], set()
    for index, row in enumerate(_read_json_or_jsonl(path)):
        try:
            if not isinstance(row, dict):
                raise _Bad("-", f"expected an object, got {json_type(row)}", "not_an_object")
            qid = _identifier(row, "question_id")
            out.append((qid, _text(row, "text")))
        except _Bad as bad:
            problems.report(path, _record_label(index, row, "question_id"), bad.field, bad.reason, bad.kind)
            skipped.add(_safe_id(row, "question_id"))
    return out, skipped


def _safe_id(row: Any, key: str) -> str | None:
    try:
        return _identifier(row, key) if isinstance(row, dict) else None
    except _Bad:
        return None


def _looks_like(row: Any) -> str | None:
    """The reference format a row shows by a field only that format has; None when it shows none."""
    if not isinstance(row, dict):
        return None
    if "conversations" in row or "conversatons" in row:
        return "conversation"
    if "phrase_type" in row:
        return "vqa_rad"
    if "q_lang" in row or "img_name" in row:
        return "slake"
    if "question_id" in row and "answer" in row and "qid" not in row:
        return "predictions"
    return None


@dataclass
class References:
    refs: list[Reference]
    skipped: set  # ids of references skipped under ``skip`` (None: one whose id is unreadable)
    n_bad: int  # references skipped under ``skip``
    left_out: Counter  # rows the released scripts do not score, by reason (other languages, train phrases)
    left_out_ids: set  # their ids: a prediction for one is left out with it


def load_references(
    path: str | Path, *, languages: tuple[str, ...] = ("en",), problems: ScoreProblems | None = None
) -> References:
    """Every scored reference of the file, in the format its first record shows (one format per file)."""
    path, problems = Path(path), problems or ScoreProblems()
    rows = _read_json_or_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no references")
    kind = _looks_like(rows[0]) or ("slake" if isinstance(rows[0], dict) and "qid" in rows[0] else None)
    if kind is None:
        raise DataError(
            f"{path}: cannot tell the reference format (expected conversation JSON, a SLAKE or "
            "VQA-RAD file, or predictions with answers)"
        )
    id_key = {"conversation": "id", "predictions": "question_id"}.get(kind, "qid")
    wanted = tuple(language.strip().lower() for language in languages)
    result = References([], set(), 0, Counter(), set())
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _Bad("-", f"expected an object, got {json_type(row)}", "not_an_object")
            shows = _looks_like(row)
            if shows not in (None, kind):
                raise _Bad(
                    "-",
                    f"a {REFERENCE_FORMATS[shows]} record in a {REFERENCE_FORMATS[kind]} file (the format of "
                    "record 0): one format per file",
                    "mixed_format",
                )
            fields = _reference_fields(kind, row, path, wanted)
            if isinstance(fields, str):  # a row the released scripts do not score
                result.left_out[fields] += 1
                result.left_out_ids.add(_safe_id(row, id_key))
                continue
            result.refs.append(Reference(answer_type=_answer_type(row, fields["answer"]), **fields))
        except _Bad as bad:
            label = _record_label(index, row, id_key, *ID_KEYS)  # a record of another format: its own id
            problems.report(path, label, bad.field, bad.reason, bad.kind)
            result.skipped.add(_safe_id(row, id_key))
            result.n_bad += 1
    return result


def _reference_fields(kind: str, row: dict, path: Path, languages: tuple[str, ...]) -> dict[str, Any] | str:
    """id, answer, modality, dataset (and task) of one reference row in the file's format; for a row the
    released scripts do not score, the reason (counted, printed)."""
    if kind == "conversation":
        key = "conversations" if "conversations" in row else "conversatons"
        convs = row[key]
        if not isinstance(convs, list):
            raise _Bad(key, f"expected a list of messages, got {json_type(convs)}")
        answers = []
        for number, message in enumerate(convs):
            if not isinstance(message, dict):
                raise _Bad(f"{key}[{number}]", f"expected a message object (from, value), got {json_type(message)}")
            speaker = _text(message, "from", required=False)
            if speaker in ("gpt", "assistant"):
                try:
                    answers.append(_text(message, "value", empty=False))
                except _Bad as bad:
                    raise _Bad(f"{key}[{number}].{bad.field}", bad.reason, bad.kind) from None
        if not answers:
            raise _Bad(key, "no gpt answer", "missing_field")
        return {
            "id": _identifier(row, "id"),  # never the position: predictions pair by id
            "answer": answers[0].strip(),
            "modality": _optional_text(row, "modality"),
            "dataset": path.stem,
        }
    if kind == "vqa_rad":  # the release: only the test phrase types are scored
        phrase = _text(row, "phrase_type")
        if phrase not in VQA_RAD_TEST_PHRASES:
            return f"phrase_type not {' / '.join(VQA_RAD_TEST_PHRASES)}"
        return {
            "id": _identifier(row, "qid"),
            "answer": _text(row, "answer", numbers=True, empty=False).strip(),
            "modality": _optional_text(row, "image_organ"),
            "dataset": "vqa_rad",
        }
    if kind == "slake":
        language = _text(row, "q_lang") if "q_lang" in row else "en"  # absent: an English-only file
        if language.strip().lower() not in languages:
            return f"q_lang not in {','.join(languages)}"
        return {
            "id": _identifier(row, "qid"),
            "answer": _text(row, "answer", numbers=True, empty=False).strip(),
            "modality": _optional_text(row, "modality"),
            "dataset": "slake",
        }
    # our predictions.jsonl: REC rows carry the ground-truth box and image size Uni-Med's REC score needs
    extra = {k: v for k in ("box", "image_size") if (v := _numbers(row, k, 4 if k == "box" else 2)) is not None}
    return {
        "id": _identifier(row, "question_id"),
        "answer": _text(row, "answer", numbers=True, empty=False),
        "task": _optional_text(row, "task") or "vqa",
        "modality": _optional_text(row, "modality"),
        "dataset": _optional_text(row, "dataset"),
        "extra": extra,
    }


def score_files(
    predictions: str | Path,
    references: str | Path,
    *,
    protocol: str = "all",
    languages: tuple[str, ...] = ("en",),
    on_bad_record: str = "error",
) -> dict[str, Any]:
    """The evaluation report restricted to the requested protocol(s), with ``records``: how many reference
    rows were read, scored, skipped as bad (``on_bad_record: skip``) and left out by the scripts' filters."""
    if protocol != "all" and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from all, {', '.join(PROTOCOLS)}")
    problems = ScoreProblems(on_bad_record)
    preds, bad_preds = load_predictions(predictions, problems)
    refs = load_references(references, languages=languages, problems=problems)
    # a skipped record takes its pair with it: the reference of a skipped prediction, the prediction of a
    # skipped reference; when a skipped record's id is unreadable, what it leaves unpaired goes too
    kept_refs = [r for r in refs.refs if r.id not in bad_preds]
    kept_preds = [(qid, text) for qid, text in preds if qid not in refs.skipped | refs.left_out_ids]
    if None in bad_preds:
        have = {qid for qid, _ in kept_preds}
        kept_refs = [r for r in kept_refs if r.id in have]
    if None in refs.skipped:
        have = {r.id for r in kept_refs}
        kept_preds = [(qid, text) for qid, text in kept_preds if qid in have]
    report = evaluation_report(pair_by_id(kept_preds, kept_refs))
    if protocol != "all":
        report["protocols"] = {protocol: report["protocols"][protocol]} if report["protocols"] else {}
    expected = len(refs.refs) + refs.n_bad
    report["records"] = {
        "n_expected": expected,
        "n_scored": report["count"],
        "n_skipped": expected - report["count"],
        "skipped": dict(problems.counts()),
        "left_out": dict(refs.left_out),
        "left_out_predictions": sum(qid in refs.left_out_ids for qid, _ in preds),
    }
    _say_records(report["records"], problems, references)
    return report


def _say_records(records: dict[str, Any], problems: ScoreProblems, references: str | Path) -> None:
    """The skips and the filters' counts, on stderr: nothing is left out without a line saying so."""
    for reason, count in records["left_out"].items():
        log.info("score: %s: left out %d references the released scripts do not score (%s)", references, count, reason)
    if records["left_out_predictions"]:
        log.info("score: left out %d predictions of those references", records["left_out_predictions"])
    if not problems.problems:
        return
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(records["skipped"].items()))
    log.warning(
        "score: skipped %d bad records (%s); scored %d of %d references",
        len(problems.problems),
        kinds,
        records["n_scored"],
        records["n_expected"],
    )
    for problem in problems.problems[:5]:
        log.warning("  %s [%s]", problem, problem.kind)
    if len(problems.problems) > 5:
        log.warning("  ... and %d more", len(problems.problems) - 5)


def protocol_header(protocols: list[str]) -> str:
    """The report header: which released script each scored protocol follows, and its metric names."""
    if not protocols:
        return ""
    return (
        "## Protocols: the released scripts they follow\n\n"
        "Each protocol reproduces one paper's evaluation script; metric names are ours, the script's "
        "own name beside each.\n\n" + protocol_sources_markdown(protocols) + "\n\n"
    )


def render(report: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(report["protocols"])
    title, _, rest = format_report(report).partition("\n\n")
    return f"{title}\n\n{protocol_header(list(report.get('protocols', {})))}{records_line(report)}{rest}"


def records_line(report: dict[str, Any]) -> str:
    """``Scored 40 of 42 references; skipped 2 bad records (wrong_type=2); left out 10 (q_lang not in en).``"""
    records = report.get("records")
    if not records:
        return ""
    line = f"Scored {records['n_scored']} of {records['n_expected']} references"
    if records["n_skipped"]:
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(records["skipped"].items()))
        line += f"; skipped {records['n_skipped']} ({kinds})"
    if records["left_out"]:
        line += "; left out " + ", ".join(f"{n} ({reason})" for reason, n in records["left_out"].items())
    return line + ".\n\n"
