"""SLAKE 1.0 release reader: ``{train,validate|validation,test}.json`` + ``imgs/xmlab<N>/``.

Each image folder holds ``source.jpg``, ``detection.json`` (a list of ``{organ: [x, y, w, h]}``),
``question.json`` and ``mask.png`` (organ labels). ``task="vqa"`` reads the QA records (English
only by default); ``task="refer"`` / ``"identify"`` build Uni-Med's box tasks from each image's
detection.json instead: "where is the liver?" -> ``{<x1><y1><x2><y2>}`` and the reverse.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import (
    PathResolver,
    answer_type_of,
    load_json_list,
    record_label,
    require_fields,
    shared,
)
from datamodules.records import Record
from medcore.boxes import format_box

SPLIT_FILES = {
    "train": ("train.json",),
    "validate": ("validate.json", "validation.json"),
    "test": ("test.json",),
}
SPLIT_ALIASES = {"val": "validate", "validation": "validate"}
REQUIRED = ("img_name", "question", "answer", "answer_type", "qid")
BOX_TASKS = ("refer", "identify")


def slake_split_name(split: str) -> str:
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLIT_FILES:
        raise DataError(f"unknown SLAKE split {split!r}; expected one of {sorted(SPLIT_FILES)}")
    return name


def slake_split_file(root: Path, split: str) -> Path:
    names = SPLIT_FILES[slake_split_name(split)]
    for name in names:
        if (root / name).is_file():
            return root / name
    raise file_error(
        root / names[0], "<file>", f"no {' or '.join(names)} in {root} for split {split!r}", "missing_file"
    )


def available_splits(root: Path) -> list[str]:
    return [s for s, names in SPLIT_FILES.items() if any((Path(root) / n).is_file() for n in names)]


def read_slake(
    root: str | Path,
    split: str,
    *,
    dataset: str = "slake",
    languages: tuple[str, ...] | list[str] = ("en",),
    problems: ProblemLog | None = None,
    check_images: bool = True,
    task: str = "vqa",
) -> list[Record]:
    """Read one split. English only by default (``languages``); empty answers are bad records."""
    root = Path(root)
    problems = problems or ProblemLog()
    path = slake_split_file(root, split)
    split_name = slake_split_name(split)
    images = PathResolver(root / "imgs", check_exists=check_images)
    organ_masks: dict[str, str] = {}  # image path -> its folder's mask.png, one string per image
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        label = record_label(index, item.get("qid") if isinstance(item, dict) else None)
        if not require_fields(item, REQUIRED, path, label, problems):
            continue
        if item.get("q_lang", "en") not in languages:
            continue
        answer = str(item["answer"]).strip()
        if not answer:
            problems.report(path, label, "answer", "empty answer", "empty_answer")
            continue
        answer_type = answer_type_of(item["answer_type"], answer, path, label, problems)
        if answer_type is None:
            continue
        image = images.resolve(str(item["img_name"]), file=path, record=label, field_name="img_name", problems=problems)
        if image is None:
            continue
        if image not in organ_masks:
            organ_masks[image] = os.path.join(os.path.dirname(image), "mask.png")
        records.append(
            Record(
                id=f"{dataset}/{item['qid']}",
                dataset=dataset,
                split=split_name,
                question=str(item["question"]),
                answer=answer,
                answer_type=answer_type,
                task="vqa",
                modality=shared(item.get("modality")),
                image_path=image,
                extra={
                    "location": shared(item.get("location")),
                    "content_type": shared(item.get("content_type")),
                    "q_lang": shared(item.get("q_lang", "en")),
                    "img_id": item.get("img_id"),
                    "organ_mask": organ_masks[image],
                },
            )
        )
    if task in BOX_TASKS:
        return box_records(records, task=task, dataset=dataset, problems=problems)
    return records


def box_records(qa_records: list[Record], *, task: str, dataset: str, problems: ProblemLog) -> list[Record]:
    """Uni-Med's refer / identify records from the detection.json of every image of a split."""
    out: list[Record] = []
    seen: set[str] = set()
    for qa in qa_records:
        if qa.image_path in seen:
            continue
        seen.add(qa.image_path)
        detection = Path(qa.image_path).parent / "detection.json"
        try:
            entries = load_json_list(detection)
        except DataError as e:  # one image's boxes are one bad record, not a broken split
            problems.report(detection, "-", "<json>", str(e.problem.reason if e.problem else e), "bad_detection")
            continue
        try:
            with Image.open(qa.image_path) as img:  # header only: the size, no decode
                width, height = img.size
        except OSError as e:
            problems.report(qa.image_path, qa.id, "image", f"cannot read the image size ({e})", "corrupt_image")
            continue
        for k, entry in enumerate(entries):
            if not (isinstance(entry, dict) and len(entry) == 1):
                problems.report(detection, k, "<record>", "expected one {organ: [x, y, w, h]} object", "bad_detection")
                continue
            ((organ, box),) = entry.items()
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                problems.report(detection, k, organ, f"expected [x, y, w, h], got {box!r}", "bad_detection")
                continue
            x, y, w, h = (float(v) for v in box)
            grid = tuple(
                min(100, max(0, round(v)))
                for v in (x / width * 100, y / height * 100, (x + w) / width * 100, (y + h) / height * 100)
            )
            box_text = format_box(grid)
            name = str(organ).strip()
            question, answer = (
                (f"Where is the {name.lower()}?", box_text) if task == "refer" else (f"What is in {box_text}?", name)
            )
            out.append(
                Record(
                    id=f"{dataset}/{task}/{qa.extra.get('img_id')}/{k}",
                    dataset=dataset,
                    split=qa.split,
                    question=question,
                    answer=answer,
                    answer_type="open",
                    task=task,
                    modality=qa.modality,
                    image_path=qa.image_path,
                    box=(x, y, w, h),
                    extra={"organ": name, "img_id": qa.extra.get("img_id"), "image_size": (width, height)},
                )
            )
    return out
