"""The one record type every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medcore.text import normalize_answer

ANSWER_TYPES = ("closed", "open")
YES_NO = ("yes", "no")


@dataclass(slots=True)  # not frozen: Lightning's apply_to_collection rebuilds the dataclasses in a batch
class Source:
    """Where records were read: the annotation file and the names its records give their id and first question.

    One object per file (and per question field: VQA-RAD's framed questions have their own), shared by its
    records, so a problem found after reading (a prompt over ``max_length``, an id in two splits, an image
    that does not decode) names the file and the field as a reader's problem does.
    """

    file: str
    id_field: str
    question_field: str


@dataclass(slots=True)
class Turn:
    """One question-answer exchange; multi-turn conversations are lists of these."""

    question: str
    answer: str


@dataclass(slots=True)  # slots: a 100k-record split is indexed in memory, ~40% smaller without __dict__
class Record:
    """One sample: an image (path or bytes, or none for text-only tasks) and a conversation.

    ``question``/``answer`` are the first turn; ``turns`` holds every turn (single-turn datasets
    have one). ``answer_type`` is ``closed`` or ``open``. Optional grounding fields:
    ``mask_path`` is the target mask of a grounding answer (MeCoVQA ``<mask>``), ``region`` the
    path of a region-prompt mask (MeCoVQA ``<region>``), ``box`` a pixel box ``(x, y, w, h)``
    (SLAKE detection.json, for refer / identify). Masks are binary: pixel >= 1 is foreground.
    ``source`` names the annotation file and the record's id and question fields (:class:`Source`).
    """

    id: str
    dataset: str
    split: str
    question: str
    answer: str
    answer_type: str
    task: str = "vqa"
    modality: str | None = None
    image_path: str | None = None
    image_bytes: bytes | None = None
    turns: list[Turn] = field(default_factory=list)
    mask_path: str | None = None
    region: Any = None
    box: tuple[float, float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: Source | None = None  # the file the record was read from (None: built in code)

    def __post_init__(self) -> None:
        if not self.turns:
            self.turns = [Turn(self.question, self.answer)]

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.image_bytes is not None


def closed_if_yes_no(answer: str) -> str:
    """Answer type derived from the answer when a release has no answer_type column."""
    return "closed" if normalize_answer(answer) in YES_NO else "open"
