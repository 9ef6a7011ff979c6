"""VQA-RAD: the original release or the hub parquet export (detected from the folder).

Original: ``VQA_RAD Dataset Public.json`` (a JSON list) beside ``VQA_RAD Image Folder/``. The split
comes from ``phrase_type``: ``freeform`` and ``para`` are train, ``test_freeform`` and ``test_para``
test. ``answer`` is cast to str, ``answer_type`` stripped and upper-cased (OPEN / CLOSED).
Hub export: ``data/{train,test}-*.parquet``; closed when the normalised answer is yes or no.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import PathResolver, load_json_list, record_label, require_fields
from datamodules.readers.hub_parquet import has_parquet, parquet_splits, read_hub_parquet
from datamodules.records import Record

ANNOTATIONS = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
PHRASE_SPLITS = {"freeform": "train", "para": "train", "test_freeform": "test", "test_para": "test"}
SPLITS = ("train", "test")
REQUIRED = ("qid", "phrase_type", "image_name", "question", "answer", "answer_type")


def vqa_rad_layout(root: Path) -> str:
    """``original`` or ``parquet``; an error naming what was expected when neither is there."""
    if (root / ANNOTATIONS).is_file():
        return "original"
    if has_parquet(root):
        return "parquet"
    raise file_error(
        root,
        "<layout>",
        f"not a VQA-RAD folder: expected '{ANNOTATIONS}' (original release) or data/train-*.parquet (hub export)",
        "missing_file",
    )


def available_splits(root: Path) -> list[str]:
    root = Path(root)
    return list(SPLITS) if vqa_rad_layout(root) == "original" else parquet_splits(root, SPLITS)


def read_vqa_rad(
    root: str | Path,
    split: str,
    *,
    dataset: str = "vqa_rad",
    problems: ProblemLog | None = None,
    check_images: bool = True,
) -> list[Record]:
    root = Path(root)
    problems = problems or ProblemLog()
    if split not in SPLITS:
        raise DataError(
            f"{root}: VQA-RAD has no split {split!r}: it has {', '.join(SPLITS)} (set the dataset's val_split: null)"
        )
    if vqa_rad_layout(root) == "parquet":
        return read_hub_parquet(root, split, dataset=dataset, problems=problems, check_images=check_images)
    path = root / ANNOTATIONS
    images = PathResolver(root / IMAGE_FOLDER, check_exists=check_images)
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        label = record_label(index, item.get("qid") if isinstance(item, dict) else None)
        if not require_fields(item, REQUIRED, path, label, problems):
            continue
        phrase = str(item["phrase_type"]).strip()
        if phrase not in PHRASE_SPLITS:
            problems.report(
                path,
                label,
                "phrase_type",
                f"unknown phrase_type {item['phrase_type']!r} (expected one of {', '.join(PHRASE_SPLITS)})",
                "unknown_phrase_type",
            )
            continue
        if PHRASE_SPLITS[phrase] != split:
            continue
        answer = str(item["answer"]).strip()
        if not answer:
            problems.report(path, label, "answer", "empty answer", "empty_answer")
            continue
        kind = str(item["answer_type"]).strip().upper()
        if kind not in ("OPEN", "CLOSED"):
            problems.report(
                path,
                label,
                "answer_type",
                f"unknown answer_type {item['answer_type']!r} (expected OPEN or CLOSED)",
                "unknown_answer_type",
            )
            continue
        image = images.resolve(
            str(item["image_name"]), file=path, record=label, field_name="image_name", problems=problems
        )
        if image is None:
            continue
        records.append(
            Record(
                id=f"{dataset}/{item['qid']}",
                dataset=dataset,
                split=split,
                question=str(item["question"]),
                answer=answer,
                answer_type=kind.lower(),
                image_path=image,
                extra={
                    "phrase_type": phrase,
                    "question_type": item.get("question_type"),
                    "image_organ": item.get("image_organ"),
                },
            )
        )
    return records
