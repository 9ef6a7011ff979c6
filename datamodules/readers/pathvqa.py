"""PathVQA: the hub parquet export, or the original ``pvqa/`` pickle release with explicit opt-in.

Hub: ``data/{train,validation,test}-*.parquet`` (``image``, ``question``, ``answer``); closed when
the answer is yes/no (or an ``answer_type`` column says yes/no or CLOSED).
Original: ``pvqa/images/{train,val,test}/<img_id>.jpg`` and ``pvqa/qas/{split}_vqa.pkl``, a list of
``{answer_type, img_id, label: {answer: score}, question_id, question_type, sent}`` (when a split has
only ``qas/{split}/{split}_qa.pkl``, a list of ``{image, question, answer}``, that is read). Reading it
needs ``allow_pickle: true`` (see :mod:`datamodules.readers.safe_pickle`). The folder given may be
``pvqa/`` itself or the folder that contains it; when both layouts are present, parquet wins.
"""

from __future__ import annotations

import math
from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import Fields, PathResolver, answer_type_of, json_type, record_label
from datamodules.readers.hub_parquet import has_parquet, parquet_splits, read_hub_parquet
from datamodules.readers.safe_pickle import load_pickle
from datamodules.records import Record, Source, closed_if_yes_no

PARQUET_SPLITS = ("train", "validation", "test")
PICKLE_SPLITS = ("train", "val", "test")
_ALIASES = {"validate": "validation", "val": "validation"}


def pickle_root(root: Path) -> Path | None:
    """The ``pvqa/`` folder (``root`` itself or ``root/pvqa``) when the pickle layout is there."""
    for candidate in (root, root / "pvqa"):
        if (candidate / "qas").is_dir():
            return candidate
    return None


def pathvqa_layout(root: Path) -> str:
    if has_parquet(root):
        return "parquet"
    if pickle_root(root) is not None:
        return "pickle"
    raise file_error(
        root,
        "<layout>",
        "not a PathVQA folder: expected data/train-*.parquet (hub export) or pvqa/qas/train_vqa.pkl (original release)",
        "missing_file",
    )


def available_splits(root: Path) -> list[str]:
    root = Path(root)
    if pathvqa_layout(root) == "parquet":
        return parquet_splits(root, PARQUET_SPLITS)
    qas = pickle_root(root) / "qas"
    return [s for s in PICKLE_SPLITS if (qas / f"{s}_vqa.pkl").is_file() or (qas / s / f"{s}_qa.pkl").is_file()]


def read_pathvqa(
    root: str | Path,
    split: str,
    *,
    dataset: str = "pathvqa",
    problems: ProblemLog | None = None,
    allow_pickle: bool = False,
    check_images: bool = True,
) -> list[Record]:
    root = Path(root)
    problems = problems or ProblemLog()
    if pathvqa_layout(root) == "parquet":
        name = _ALIASES.get(split, split)
        if name not in PARQUET_SPLITS:
            raise DataError(f"{root}: PathVQA has no split {split!r}; expected one of {PARQUET_SPLITS}")
        return read_hub_parquet(root, name, dataset=dataset, problems=problems, check_images=check_images)
    name = "val" if split in ("validate", "validation") else split
    if name not in PICKLE_SPLITS:
        raise DataError(f"{root}: PathVQA has no split {split!r}; expected one of {PICKLE_SPLITS}")
    pvqa = pickle_root(root)
    path = pvqa / "qas" / f"{name}_vqa.pkl"
    qa_path = pvqa / "qas" / name / f"{name}_qa.pkl"
    if not path.is_file() and qa_path.is_file():  # only the simpler {image, question, answer} pickles
        return _read_qa_pickle(
            qa_path,
            pvqa / "images" / name,
            split=name,
            dataset=dataset,
            problems=problems,
            allow_pickle=allow_pickle,
            check_images=check_images,
        )
    items = load_pickle(path, allow_pickle=allow_pickle, dataset=dataset)
    if not isinstance(items, list):
        raise file_error(
            path, "<pickle>", f"expected a list of records, got {type(items).__name__}", "malformed_pickle"
        )
    images = PathResolver(pvqa / "images" / name, check_exists=check_images)
    source = Source(str(path), "question_id", "sent")
    records: list[Record] = []
    for index, item in enumerate(items):
        fields = Fields(
            item,
            file=path,
            record=record_label(index, item.get("question_id") if isinstance(item, dict) else None),
            problems=problems,
        )
        qid = fields.ident("question_id")
        img_id = fields.ident("img_id")
        question = fields.text("sent", what="question")
        answer = _answer(fields)
        answer_type = answer_type_of(fields, answer or "", yes_no_closes=True)
        question_type = fields.text("question_type", optional=True)
        if not fields.ok:
            continue
        image = images.resolve(f"{img_id}.jpg", file=path, record=fields.record, field_name="img_id", problems=problems)
        if image is None:
            continue
        records.append(
            Record(
                id=f"{dataset}/{qid}",
                dataset=dataset,
                split=name,
                question=question,
                answer=answer,
                answer_type=answer_type,
                image_path=image,
                extra={"question_type": question_type, "img_id": img_id},
                source=source,
            )
        )
    return records


def _read_qa_pickle(
    path: Path,
    image_dir: Path,
    *,
    split: str,
    dataset: str,
    problems: ProblemLog,
    allow_pickle: bool,
    check_images: bool,
) -> list[Record]:
    """``qas/{split}/{split}_qa.pkl``: a list of ``{image, question, answer}`` (image = the img_id).

    It has no question ids, so ids are ``<dataset>/<split>/<index>``; closed when the answer is yes/no.
    """
    items = load_pickle(path, allow_pickle=allow_pickle, dataset=dataset)
    if not isinstance(items, list):
        raise file_error(
            path, "<pickle>", f"expected a list of records, got {type(items).__name__}", "malformed_pickle"
        )
    images = PathResolver(image_dir, check_exists=check_images)
    source = Source(str(path), "<index>", "question")
    records: list[Record] = []
    for index, item in enumerate(items):
        rid = f"{dataset}/{split}/{index}"
        fields = Fields(item, file=path, record=record_label(index, rid), problems=problems)
        question = fields.text("question", what="question")
        answer = fields.text("answer", what="answer")
        name = fields.text("image", what="path")
        if not fields.ok:
            continue
        image = images.resolve(
            name if Path(name).suffix else f"{name}.jpg",
            file=path,
            record=fields.record,
            field_name="image",
            problems=problems,
        )
        if image is None:
            continue
        records.append(
            Record(
                id=rid,
                dataset=dataset,
                split=split,
                question=question,
                answer=answer,
                answer_type=closed_if_yes_no(answer),
                image_path=image,
                extra={"img_id": Path(name).stem},
                source=source,
            )
        )
    return records


def _answer(fields: Fields) -> str | None:
    """The best-scored answer of the ``{answer: score}`` label (scores are finite numbers); None after
    reporting a label of another shape, an empty one (``empty_answer``) or a non-numeric score."""
    label = fields.item.get("label") if fields.ok else None
    if not fields.ok:
        return None
    if label is None:
        fields.report(
            "label", "missing field" if "label" not in fields.item else "null (expected an object)", "missing_field"
        )
        return None
    if not isinstance(label, dict):
        fields.report("label", f"expected an {{answer: score}} object, got {json_type(label)}", "wrong_type")
        return None
    if not label:
        fields.report("label", "no answer in label {}", "empty_answer")
        return None
    for answer, score in label.items():
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            fields.report(
                "label", f"score of answer {answer!r} is {json_type(score)}, not a finite number", "wrong_type"
            )
            return None
    best = max(label.items(), key=lambda kv: kv[1])[0]
    return fields.text("label", what="answer", value=best)
