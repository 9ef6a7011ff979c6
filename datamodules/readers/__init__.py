"""One reader per released format; each returns :class:`datamodules.records.Record` lists."""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import ProblemLog
from datamodules.records import Record
from datamodules.specs import DatasetSpec


def read_split(spec: DatasetSpec, name: str, split: str, problems: ProblemLog) -> list[Record]:
    """Records of ``split`` (a release split name) of the dataset ``name`` described by ``spec``."""
    root = Path(spec.path)
    if spec.format == "slake":
        from datamodules.readers.slake import read_slake

        records = read_slake(root, split, dataset=name, languages=tuple(spec.languages), problems=problems)
    elif spec.format == "conversation":
        from datamodules.readers.conversation import read_conversation

        records = read_conversation(root, split, dataset=name, image_root=spec.image_root, problems=problems,
                                    task=spec.task)
    else:
        raise ValueError(f"dataset {name!r}: unknown format {spec.format!r}")
    if spec.task != "vqa":  # the spec's task tags records the reader left at the default
        for r in records:
            r.task = spec.task if r.task == "vqa" else r.task
    if spec.max_samples is not None:
        records = records[: spec.max_samples]
    return records
