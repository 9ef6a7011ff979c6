"""Typed dataset specifications; the pipeline's config schema embeds these directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

FORMATS = ("slake", "conversation")


@dataclass
class SyntheticSpec:
    """Write a phantom dataset in the format's release layout at ``path`` when it is absent."""

    kind: str = "vqa"  # vqa | caption (caption: conversation format only)
    train_images: int = 240
    val_images: int = 30
    test_images: int = 60
    questions_per_image: int = 6
    image_size: int = 128
    seed: int = 0


@dataclass
class DatasetSpec:
    format: str = "slake"
    path: str = "???"
    # split name in our pipeline -> split name in the release
    train_split: Optional[str] = "train"
    val_split: Optional[str] = "validate"
    test_split: Optional[str] = "test"
    languages: list[str] = field(default_factory=lambda: ["en"])
    image_root: Optional[str] = None  # conversation files: folder the image paths are relative to
    task: str = "vqa"
    weight: float = 1.0
    max_samples: Optional[int] = None
    synthetic: Optional[SyntheticSpec] = None
