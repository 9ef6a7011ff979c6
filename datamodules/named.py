"""One LightningDataModule per dataset, for notebooks and scripts that use a single release.

Each is :class:`datamodules.datamodule.VQADataModule` (the mixture DataModule) over one
:class:`DatasetSpec` with that release's split names; every other keyword goes to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.datamodule import VQADataModule
from datamodules.specs import DatasetSpec


class VQARADDataModule(VQADataModule):
    """VQA-RAD, original JSON + image folder or hub parquet (train / test; no validation split)."""

    def __init__(self, path: str | Path, **options: Any) -> None:
        spec = DatasetSpec(format="vqa_rad", path=str(path), val_split=None)
        super().__init__(datasets={"vqa_rad": spec}, **options)


class SlakeDataModule(VQADataModule):
    """SLAKE 1.0; ``languages`` filters q_lang; ``task`` refer / identify builds box records."""

    def __init__(
        self, path: str | Path, *, languages: tuple[str, ...] = ("en",), task: str = "vqa", **options: Any
    ) -> None:
        spec = DatasetSpec(format="slake", path=str(path), languages=list(languages), task=task)
        super().__init__(datasets={"slake": spec}, **options)


class PathVQADataModule(VQADataModule):
    """PathVQA, hub parquet; the pickle release only with ``allow_pickle=True`` (it runs code)."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, **options: Any) -> None:
        spec = DatasetSpec(format="pathvqa", path=str(path), val_split="validation", allow_pickle=allow_pickle)
        super().__init__(datasets={"pathvqa": spec}, **options)


class ConversationDataModule(VQADataModule):
    """LLaVA-style conversation JSON files (``<split>.json``) with images under ``image_root``."""

    def __init__(
        self,
        path: str | Path,
        *,
        image_root: str | Path | None = None,
        task: str = "vqa",
        val_split: str | None = "validate",
        **options: Any,
    ) -> None:
        spec = DatasetSpec(
            format="conversation",
            path=str(path),
            image_root=str(image_root) if image_root else None,
            task=task,
            val_split=val_split,
        )
        super().__init__(datasets={"conversation": spec}, **options)


class MeCoVQADataModule(VQADataModule):
    """MeCoVQA Complex / Region / Grounding (train / test; no validation split)."""

    def __init__(
        self,
        path: str | Path,
        *,
        subsets: list[str] | None = None,
        image_root: str | Path | None = None,
        **options: Any,
    ) -> None:
        spec = DatasetSpec(
            format="mecovqa",
            path=str(path),
            val_split=None,
            subsets=subsets,
            image_root=str(image_root) if image_root else None,
        )
        super().__init__(datasets={"mecovqa": spec}, **options)
