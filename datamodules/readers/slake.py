"""SLAKE 1.0 release reader: ``{train,validate|validation,test}.json`` + ``imgs/``."""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import DataError, ProblemLog
from datamodules.readers.common import load_json_list, require_fields, resolve_inside
from datamodules.records import Record

SPLIT_FILES = {
    "train": ("train.json",),
    "validate": ("validate.json", "validation.json"),
    "test": ("test.json",),
}
REQUIRED = ("img_name", "question", "answer", "answer_type", "qid")


def slake_split_file(root: Path, split: str) -> Path:
    names = SPLIT_FILES.get("validate" if split in ("val", "validation") else split)
    if names is None:
        raise DataError(f"{root}: unknown SLAKE split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    for name in names:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no {' or '.join(names)} for split {split!r}")


def read_slake(root: str | Path, split: str, *, dataset: str = "slake",
               languages: tuple[str, ...] | list[str] = ("en",), problems: ProblemLog | None = None,
               check_images: bool = True) -> list[Record]:
    """Read one split. English only by default (``languages``); empty answers are bad records."""
    root = Path(root)
    problems = problems or ProblemLog()
    path = slake_split_file(root, split)
    items = load_json_list(path)
    records: list[Record] = []
    split_name = "validate" if split in ("val", "validation") else split
    for index, item in enumerate(items):
        if not require_fields(item, REQUIRED, path, index, problems):
            continue
        if item.get("q_lang", "en") not in languages:
            continue
        rid = f"{dataset}/{item['qid']}"
        answer = str(item["answer"]).strip()
        if not answer:
            problems.report(path, rid, "answer", "empty answer", "empty_answer")
            continue
        answer_type = str(item["answer_type"]).strip().lower()
        if answer_type not in ("closed", "open"):
            problems.report(path, rid, "answer_type", f"unknown answer_type {item['answer_type']!r} "
                            "(expected OPEN or CLOSED)", "unknown_answer_type")
            continue
        image = resolve_inside(root / "imgs", str(item["img_name"]), path, rid, "img_name", problems,
                               check_exists=check_images)
        if image is None:
            continue
        records.append(Record(
            id=rid, dataset=dataset, split=split_name, question=str(item["question"]), answer=answer,
            answer_type=answer_type, task="vqa", modality=item.get("modality"), image_path=str(image),
            extra={"location": item.get("location"), "content_type": item.get("content_type"),
                   "q_lang": item.get("q_lang", "en"), "img_id": item.get("img_id")},
        ))
    return records
