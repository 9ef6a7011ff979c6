"""Typed dataset specifications; the pipeline's config schema embeds these directly.

``format`` and ``task`` are ``Literal`` fields (the config rejects other values when a YAML layer is merged);
:meth:`DatasetSpec.problems` checks what depends on the format (split names, subsets, split conventions,
synthetic kinds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from medcore.checks import Problem, choice, positive

DatasetFormat = Literal["vqa_rad", "slake", "pathvqa", "conversation", "mecovqa"]
# Uni-Med's task tags, plus MedPLIB's region-prompt and pixel-grounding tasks (MeCoVQA).
Task = Literal["vqa", "refer", "identify", "caption", "cls", "qa", "region", "grounding"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)
TASKS: tuple[str, ...] = get_args(Task)
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
# Which question-answer pairs make a release's splits, where papers disagree (a reported number depends on it).
# VQA-RAD (datamodules/readers/vqa_rad.py): freeform_para = the 2,248-pair freeform / para split by phrase_type
# (1,797 train / 451 test; LLaVA-Med's); mevf = MEVF's data_RAD split (3,064 / 451, 3,515 pairs: every non-NULL
# question_frame becomes a further train pair, also those of test questions; Med-MoE's).
SplitConvention = Literal["freeform_para", "mevf"]
# The most pixels an image or mask may claim (a dataset's ``max_image_pixels``): PIL's own warning threshold,
# 89.5 M pixels (a 9459 x 9459 image, ~270 MB as 8-bit RGB). Release images are far smaller; a header past it is
# a decompression bomb (a 30000 x 30000 PNG fits in a few hundred KB) until a dataset raises its limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
SPLIT_CONVENTIONS: dict[str, tuple[str, ...]] = {"vqa_rad": get_args(SplitConvention)}


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
    format: DatasetFormat = "slake"
    path: str = "???"
    # split name in our pipeline -> split name in the release (null: the release has none,
    # e.g. VQA-RAD and MeCoVQA have no validation split)
    train_split: str | None = "train"
    val_split: str | None = "validate"
    test_split: str | None = "test"
    languages: list[str] = field(default_factory=lambda: ["en"])  # slake: q_lang values kept
    image_root: str | None = None  # conversation / mecovqa: folder image (and mask) paths are relative to
    task: Task = "vqa"  # TASKS; slake: refer / identify build box records from detection.json
    subsets: list[str] | None = None  # mecovqa: complex, region, grounding (default: all)
    allow_pickle: bool = False  # pathvqa: read the original pickle release (unpickling runs code)
    # vqa_rad: which pairs make the splits (SplitConvention above); null = freeform_para
    convention: SplitConvention | None = None
    # relative sampling probability in a mixture (Uni-Med's sample ratio): dataset d is drawn with
    # probability weight_d / sum(weights); weights proportional to sizes reproduce concatenation
    weight: float = 1.0
    max_samples: int | None = None
    # the most pixels an image or mask may claim in its header (checked before decoding): past it, the record is
    # a bad record (a decompression bomb)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    synthetic: SyntheticSpec | None = None

    def problems(self, key: str) -> list[Problem]:
        """What the types cannot say: the release's split names, MeCoVQA subsets, synthetic kinds and layouts."""
        from datamodules.readers import SPLIT_NAMES
        from datamodules.readers.mecovqa import SUBSETS

        found = positive(f"{key}.weight", self.weight) + positive(f"{key}.max_image_pixels", self.max_image_pixels)
        splits = SPLIT_NAMES[self.format]
        for split_key in ("train_split", "val_split", "test_split"):
            value = getattr(self, split_key)
            if splits is not None and value is not None and value not in splits:
                found.append(
                    (
                        f"{key}.{split_key}",
                        f"{self.format} has no split {value!r} (it has "
                        f"{', '.join(splits)}; set null when the release has no such split)",
                    )
                )
        for subset in self.subsets or []:
            found += choice(f"{key}.subsets", subset, SUBSETS)
        if self.convention is not None:
            conventions = SPLIT_CONVENTIONS.get(self.format)
            if conventions is None:
                found.append(
                    (
                        f"{key}.convention",
                        f"{self.format} has no split conventions (only {', '.join(SPLIT_CONVENTIONS)} has: set null)",
                    )
                )
            else:
                found += choice(f"{key}.convention", self.convention, conventions)
            layout = self.synthetic.layout if self.synthetic is not None else None
            if self.convention == "mevf" and layout == "parquet":
                found.append((f"{key}.convention", "mevf needs question_frame: the hub parquet export has none"))
        if self.synthetic is not None:
            found += choice(f"{key}.synthetic.kind", self.synthetic.kind, SYNTHETIC_KINDS.get(self.format, ("vqa",)))
            if not 0 <= self.synthetic.zh_fraction <= 1:
                found.append((f"{key}.synthetic.zh_fraction", f"must be in [0, 1], got {self.synthetic.zh_fraction}"))
            if self.synthetic.layout is not None:
                found += choice(f"{key}.synthetic.layout", self.synthetic.layout, LAYOUTS[self.format])
        return found
