"""SLAKE 1.0 release reader: ``{train,validate|validation,test}.json`` + ``imgs/xmlab<N>/``.

Each image folder holds ``source.jpg``, ``detection.json`` (a list of ``{organ: [x, y, w, h]}``),
``question.json`` and ``mask.png`` (organ labels). ``task="vqa"`` reads the QA records (English
only by default); ``task="refer"`` / ``"identify"`` build Uni-Med's box tasks from each image's
detection.json instead: "where is the liver?" -> ``{<x1><y1><x2><y2>}`` and the reverse.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

from datamodules.images import DEFAULT_MAX_IMAGE_PIXELS, image_size
from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import (
    Fields,
    PathResolver,
    answer_type_of,
    language_key,
    load_json_list,
    record_label,
    shared,
)
from datamodules.records import Record, Source
from medcore.boxes import format_box

SPLIT_FILES = {
    "train": ("train.json",),
    "validate": ("validate.json", "validation.json"),
    "test": ("test.json",),
}
SPLIT_ALIASES = {"val": "validate", "validation": "validate"}
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
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Record]:
    """Read one split. English only by default (``languages``, matched in any case: "EN" is "en"); the records
    of other languages are counted as left out by configuration. A missing or null ``q_lang``, an empty answer
    or question, and a field of another type are bad records."""
    root = Path(root)
    problems = problems or ProblemLog()
    path = slake_split_file(root, split)
    split_name = slake_split_name(split)
    images = PathResolver(root / "imgs", check_exists=check_images)
    wanted = {language_key(language) for language in languages}
    source = Source(str(path), "qid", "question")
    organ_masks: dict[str, str] = {}  # image path -> its folder's mask.png, one string per image
    other_languages: Counter = Counter()
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        fields = Fields(
            item,
            file=path,
            record=record_label(index, item.get("qid") if isinstance(item, dict) else None),
            problems=problems,
        )
        qid = fields.ident("qid")
        q_lang = fields.text("q_lang", what="language")
        if q_lang is not None and language_key(q_lang) not in wanted:
            other_languages[q_lang] += 1
            continue
        question = fields.text("question", what="question")
        answer = fields.text("answer", what="answer")
        answer_type = answer_type_of(fields, answer or "", required=True)
        img_name = fields.text("img_name", what="path")
        modality = fields.text("modality", optional=True)
        img_id = fields.ident("img_id", optional=task not in BOX_TASKS)  # the box tasks' record ids
        if not fields.ok:
            continue
        image = images.resolve(img_name, file=path, record=fields.record, field_name="img_name", problems=problems)
        if image is None:
            continue
        if image not in organ_masks:
            organ_masks[image] = os.path.join(os.path.dirname(image), "mask.png")
        records.append(
            Record(
                id=f"{dataset}/{qid}",
                dataset=dataset,
                split=split_name,
                question=question,
                answer=answer,
                answer_type=answer_type,
                task="vqa",
                modality=shared(modality),
                image_path=image,
                extra={
                    "location": shared(item.get("location")),
                    "content_type": shared(item.get("content_type")),
                    "q_lang": shared(q_lang),
                    "img_id": img_id,
                    "organ_mask": organ_masks[image],
                },
                source=source,
            )
        )
    for q_lang, count in sorted(other_languages.items()):
        problems.filter(path, f"q_lang {q_lang!r} not in languages {sorted(wanted)}", count)
    if task in BOX_TASKS:
        return box_records(records, task=task, dataset=dataset, problems=problems, max_image_pixels=max_image_pixels)
    return records


def box_records(
    qa_records: list[Record],
    *,
    task: str,
    dataset: str,
    problems: ProblemLog,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Record]:
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
        try:  # header only: the size, no decode
            width, height = image_size(qa.image_path, record=qa.id, max_pixels=max_image_pixels)
        except DataError as e:
            problems.report(e.problem.file, e.problem.record, e.problem.field, e.problem.reason, e.problem.kind)
            continue
        source = Source(str(detection), "<entry>", "<organ>")
        for k, entry in enumerate(entries):
            if not (isinstance(entry, dict) and len(entry) == 1):
                problems.report(detection, k, "<record>", "expected one {organ: [x, y, w, h]} object", "bad_detection")
                continue
            ((organ, box),) = entry.items()
            if not organ.strip():
                problems.report(detection, k, "<organ>", "empty organ name", "bad_detection")
                continue
            if (
                not (isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box))
                or min(box[2:]) <= 0
            ):
                problems.report(
                    detection,
                    k,
                    organ,
                    f"expected [x, y, w, h] (finite numbers, w and h > 0), got {box!r}",
                    "bad_detection",
                )
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
                    source=source,
                )
            )
    return out


def _finite_number(value: object) -> bool:
    """A JSON number that is a coordinate: an int or a finite float, not a boolean."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
