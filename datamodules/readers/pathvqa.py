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

from pathlib import Path

from datamodules.problems import DataError, ProblemLog, file_error
from datamodules.readers.common import PathResolver, record_label, require_fields
from datamodules.readers.hub_parquet import has_parquet, parquet_splits, read_hub_parquet
from datamodules.readers.safe_pickle import load_pickle
from datamodules.records import Record, closed_if_yes_no

PARQUET_SPLITS = ("train", "validation", "test")
PICKLE_SPLITS = ("train", "val", "test")
_ALIASES = {"validate": "validation", "val": "validation"}
REQUIRED = ("img_id", "label", "question_id", "sent")
QA_REQUIRED = ("image", "question", "answer")
CLOSED_TYPES = ("yes/no", "closed")


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
    records: list[Record] = []
    for index, item in enumerate(items):
        label = record_label(index, item.get("question_id") if isinstance(item, dict) else None)
        if not require_fields(item, REQUIRED, path, label, problems):
            continue
        answer = _answer(item["label"])
        if not answer:
            problems.report(path, label, "label", f"no answer in label {item['label']!r}", "empty_answer")
            continue
        raw_type = str(item.get("answer_type", "")).strip().lower()
        closed = raw_type in CLOSED_TYPES or closed_if_yes_no(answer) == "closed"
        image = images.resolve(f"{item['img_id']}.jpg", file=path, record=label, field_name="img_id", problems=problems)
        if image is None:
            continue
        records.append(
            Record(
                id=f"{dataset}/{item['question_id']}",
                dataset=dataset,
                split=name,
                question=str(item["sent"]),
                answer=answer,
                answer_type="closed" if closed else "open",
                image_path=image,
                extra={"question_type": item.get("question_type"), "img_id": str(item["img_id"])},
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
    records: list[Record] = []
    for index, item in enumerate(items):
        rid = f"{dataset}/{split}/{index}"
        label = record_label(index, rid)
        if not require_fields(item, QA_REQUIRED, path, label, problems):
            continue
        answer = str(item["answer"]).strip()
        if not answer:
            problems.report(path, label, "answer", "empty answer", "empty_answer")
            continue
        name = str(item["image"])
        image = images.resolve(
            name if Path(name).suffix else f"{name}.jpg", file=path, record=label, field_name="image", problems=problems
        )
        if image is None:
            continue
        records.append(
            Record(
                id=rid,
                dataset=dataset,
                split=split,
                question=str(item["question"]),
                answer=answer,
                answer_type=closed_if_yes_no(answer),
                image_path=image,
                extra={"img_id": Path(name).stem},
            )
        )
    return records


def _answer(label: object) -> str:
    """The best-scored answer of a ``{answer: score}`` label ("" when there is none)."""
    if not isinstance(label, dict) or not label:
        return ""
    best = max(label.items(), key=lambda kv: kv[1] if isinstance(kv[1], (int, float)) else 0)[0]
    return str(best).strip()
