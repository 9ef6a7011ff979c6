"""Typed dataset specifications; the pipeline's config schema embeds these directly."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("vqa_rad", "slake", "pathvqa", "conversation", "mecovqa")
# Uni-Med's task tags, plus MedPLIB's region-prompt and pixel-grounding tasks (MeCoVQA).
TASKS = ("vqa", "refer", "identify", "caption", "cls", "qa", "region", "grounding")
# Task id of each task: its position in TASKS (append new tasks at the end so ids stay stable). The
# batch carries these ids; CMoE's task embeddings and hard routing are indexed by them.
TASK_IDS = {task: index for index, task in enumerate(TASKS)}
# Synthetic release layouts per format (the first is the default).
LAYOUTS = {
    "vqa_rad": ("original", "parquet"),
    "slake": ("validate", "validation"),  # name of the validation split file
    "pathvqa": ("parquet", "pickle"),
    "conversation": ("default",),
    "mecovqa": ("default",),
}
# other formats: vqa only; conversation "cls" = one class label per image, "qa" = text-only questions
SYNTHETIC_KINDS = {"conversation": ("vqa", "caption", "cls", "qa")}


@dataclass
class SyntheticSpec:
    """Write a phantom dataset in the format's release layout at ``path`` when it is absent."""

    kind: str = "vqa"  # vqa | caption | cls | qa (the last three: conversation format only)
    layout: str | None = None  # LAYOUTS[format]; None = the first
    train_images: int = 240
    val_images: int = 30
    test_images: int = 60
    questions_per_image: int = 6
    image_size: int = 128
    zh_fraction: float = 0.0  # slake: Chinese copies of closed questions, for the language filter
    seed: int = 0


@dataclass
class DatasetSpec:
    format: str = "slake"
    path: str = "???"
    # split name in our pipeline -> split name in the release (null: the release has none,
    # e.g. VQA-RAD and MeCoVQA have no validation split)
    train_split: str | None = "train"
    val_split: str | None = "validate"
    test_split: str | None = "test"
    languages: list[str] = field(default_factory=lambda: ["en"])  # slake: q_lang values kept
    image_root: str | None = None  # conversation / mecovqa: folder image (and mask) paths are relative to
    task: str = "vqa"  # TASKS; slake: refer / identify build box records from detection.json
    subsets: list[str] | None = None  # mecovqa: complex, region, grounding (default: all)
    allow_pickle: bool = False  # pathvqa: read the original pickle release (unpickling runs code)
    # relative sampling probability in a mixture (Uni-Med's sample ratio): dataset d is drawn with
    # probability weight_d / sum(weights); weights proportional to sizes reproduce concatenation
    weight: float = 1.0
    max_samples: int | None = None
    synthetic: SyntheticSpec | None = None
