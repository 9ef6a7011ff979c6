"""One reader per released format; each returns :class:`datamodules.records.Record` lists.

Readers index annotations only: no image is opened (with ``check_images`` each distinct image
path is ``stat``-ed once). Decoding is left to the dataset's ``__getitem__`` and to
:mod:`datamodules.verify` (``medpipe data check``, ``data.verify_images``).
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import ProblemLog
from datamodules.records import Record
from datamodules.specs import DatasetSpec

# release split names each format knows (conversation: any JSON file in the folder)
SPLIT_NAMES = {
    "vqa_rad": ("train", "test"),
    "slake": ("train", "validate", "validation", "val", "test"),
    "pathvqa": ("train", "validation", "validate", "val", "test"),
    "mecovqa": ("train", "test"),
    "conversation": None,
}


def read_split(
    spec: DatasetSpec, name: str, split: str, problems: ProblemLog, *, check_images: bool = True
) -> list[Record]:
    """Records of ``split`` (a release split name) of the dataset ``name`` described by ``spec``."""
    root = Path(spec.path)
    if spec.format == "slake":
        from datamodules.readers.slake import read_slake

        records = read_slake(
            root,
            split,
            dataset=name,
            languages=tuple(spec.languages),
            problems=problems,
            check_images=check_images,
            task=spec.task,
            max_image_pixels=spec.max_image_pixels,
        )
    elif spec.format == "conversation":
        from datamodules.readers.conversation import read_conversation

        records = read_conversation(
            root,
            split,
            dataset=name,
            image_root=spec.image_root,
            problems=problems,
            task=spec.task,
            check_images=check_images,
        )
    elif spec.format == "vqa_rad":
        from datamodules.readers.vqa_rad import read_vqa_rad

        records = read_vqa_rad(
            root,
            split,
            dataset=name,
            problems=problems,
            check_images=check_images,
            convention=spec.convention or "freeform_para",
        )
    elif spec.format == "pathvqa":
        from datamodules.readers.pathvqa import read_pathvqa

        records = read_pathvqa(
            root, split, dataset=name, problems=problems, allow_pickle=spec.allow_pickle, check_images=check_images
        )
    elif spec.format == "mecovqa":
        from datamodules.readers.mecovqa import read_mecovqa

        records = read_mecovqa(
            root,
            split,
            dataset=name,
            subsets=spec.subsets,
            image_root=spec.image_root,
            problems=problems,
            check_images=check_images,
        )
    else:
        raise ValueError(f"dataset {name!r}: unknown format {spec.format!r}")
    if spec.task != "vqa":  # the spec's task tags records the reader left at the default
        for r in records:
            r.task = spec.task if r.task == "vqa" else r.task
    records = drop_duplicate_ids(records, problems, source=root)
    if spec.max_samples is not None:
        problems.filter(root, f"{split} split past max_samples={spec.max_samples}", len(records[spec.max_samples :]))
        records = records[: spec.max_samples]
    return records


def drop_duplicate_ids(records: list[Record], problems: ProblemLog, *, source: Path) -> list[Record]:
    """Predictions pair with references by id, so a repeated id is a bad record (the later one)."""
    seen: set[str] = set()
    kept: list[Record] = []
    for r in records:
        if r.id in seen:
            problems.report(source, r.id, "id", f"duplicate record id {r.id!r} in split {r.split!r}", "duplicate_id")
            continue
        seen.add(r.id)
        kept.append(r)
    return kept


def cross_split_ids(splits: dict[str, list[Record]], problems: ProblemLog) -> None:
    """Report every record whose id is also in an earlier split (``split_leakage``): predictions are scored
    by id, and a question in both train and test is scored on what the model trained on. The reason says
    whether the two records ask the same question about the same image (a leak) or only share the id."""
    first: dict[str, tuple[str, Record]] = {}  # id -> (split, record) where it was first seen
    for split in sorted(splits, key=lambda name: name != "train"):  # train first: the others' records are reported
        records = splits[split]
        for r in records:
            other_split, other = first.setdefault(r.id, (split, r))
            if other_split == split:
                continue
            same = (other.question, other.image_path, other.image_bytes) == (r.question, r.image_path, r.image_bytes)
            what = "the same question about the same image" if same else "another question or image"
            problems.report(
                r.source.file if r.source else r.dataset,
                r.id,
                r.source.id_field if r.source else "id",
                f"id also in split {other_split!r} ({what}): leakage between splits",
                "split_leakage",
            )


def available_splits(spec: DatasetSpec) -> list[str]:
    """The release splits present in the dataset folder (used by ``medpipe data check``)."""
    from importlib import import_module

    module = import_module(f"datamodules.readers.{spec.format}")
    return module.available_splits(Path(spec.path))
