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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datamodules.problems import DataError
from datamodules.records import closed_if_yes_no
from lightningmodules.metrics.pairing import Reference, pair_by_id
from lightningmodules.metrics.protocols import PROTOCOLS, protocol_sources_markdown
from lightningmodules.metrics.report import evaluation_report, format_report

VQA_RAD_TEST_PHRASES = ("test_freeform", "test_para")
_ANSWER_TYPES = {"open": "open", "closed": "closed", "close": "closed", "yes/no": "closed", "other": "open"}


def _read_json_or_jsonl(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {number}: not valid JSON ({e.msg})") from None
    return rows


def _answer_type(raw: Any, answer: str, path: Path, rid: str) -> str:
    if raw is None:
        return closed_if_yes_no(answer)
    kind = _ANSWER_TYPES.get(str(raw).strip().lower())
    if kind is None:
        raise DataError(f"{path}: record {rid}: field 'answer_type': unknown answer_type {raw!r}")
    return kind


def load_predictions(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    rows = _read_json_or_jsonl(path)
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise DataError(f"{path}: record {index}: field 'question_id'/'text': a prediction needs both")
        out.append((str(row["question_id"]), str(row["text"])))
    return out


def load_references(path: str | Path, *, languages: tuple[str, ...] = ("en",)) -> list[Reference]:
    path = Path(path)
    rows = _read_json_or_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no references")
    refs: list[Reference] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {index}: expected an object")
        fields = _reference_fields(rows[0], row, index, path, languages)
        if fields is None:  # a split the scripts leave out: VQA-RAD's non-test phrases, other SLAKE languages
            continue
        answer_type = _answer_type(row.get("answer_type"), fields["answer"], path, fields["id"])
        refs.append(Reference(answer_type=answer_type, **fields))
    return refs


def _reference_fields(
    first: dict, row: dict, index: int, path: Path, languages: tuple[str, ...]
) -> dict[str, Any] | None:
    """id, answer, modality, dataset (and task) of one reference row, in the format the file's first row
    shows; None for a row the released scripts do not score."""
    if "conversations" in first or "conversatons" in first:
        convs = row.get("conversations", row.get("conversatons")) or []
        answers = [str(m.get("value", "")) for m in convs if m.get("from") in ("gpt", "assistant")]
        if not answers:
            raise DataError(f"{path}: record {row.get('id', index)}: field 'conversations': no gpt answer")
        return {
            "id": str(row.get("id", index)),
            "answer": answers[0].strip(),
            "modality": row.get("modality"),
            "dataset": path.stem,
        }
    if "phrase_type" in first:  # VQA-RAD release
        if row.get("phrase_type") not in VQA_RAD_TEST_PHRASES:
            return None
        return {
            "id": str(row["qid"]),
            "answer": str(row["answer"]).strip(),
            "modality": row.get("image_organ"),
            "dataset": "vqa_rad",
        }
    if "qid" in first:  # SLAKE split file
        if row.get("q_lang", "en") not in languages:
            return None
        return {
            "id": str(row["qid"]),
            "answer": str(row["answer"]).strip(),
            "modality": row.get("modality"),
            "dataset": "slake",
        }
    if "question_id" in first and "answer" in first:  # our predictions.jsonl
        return {
            "id": str(row["question_id"]),
            "answer": str(row["answer"]),
            "task": row.get("task") or "vqa",
            "modality": row.get("modality"),
            "dataset": row.get("dataset"),
            # REC rows: the ground-truth box and image size Uni-Med's REC score needs (pixels)
            "extra": {k: row[k] for k in ("box", "image_size") if row.get(k) is not None},
        }
    raise DataError(
        f"{path}: cannot tell the reference format (expected conversation JSON, a SLAKE or "
        "VQA-RAD file, or predictions with answers)"
    )


def score_files(
    predictions: str | Path, references: str | Path, *, protocol: str = "all", languages: tuple[str, ...] = ("en",)
) -> dict[str, Any]:
    """The evaluation report restricted to the requested protocol(s)."""
    if protocol != "all" and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from all, {', '.join(PROTOCOLS)}")
    pairs = pair_by_id(load_predictions(predictions), load_references(references, languages=languages))
    report = evaluation_report(pairs)
    if protocol != "all":
        report["protocols"] = {protocol: report["protocols"][protocol]} if report["protocols"] else {}
    return report


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
    return f"{title}\n\n{protocol_header(list(report.get('protocols', {})))}{rest}"
