"""SLAKE-style questions whose answers follow from a phantom's pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.synthetic.phantoms import BODY_PARTS, LARGEST_ORGAN, MODALITIES, Phantom


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str  # "CLOSED" | "OPEN"
    content_type: str  # SLAKE content_type: Abnormality, Modality, Organ, Position, Quantity, Plane


def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def _article(word: str) -> str:
    return "an" if word[0] in "AEIOUMX" else "a"  # "an MRI", "an X-Ray", "a CT"


def phantom_questions(p: Phantom, rng: np.random.Generator, per_image: int = 6) -> list[QA]:
    """Draw ``per_image`` distinct question kinds about ``p``, about half closed and half open."""
    has_lesion = p.lesion_count > 0
    other_mod = MODALITIES[rng.integers(len(MODALITIES))]
    other_part = BODY_PARTS[rng.integers(len(BODY_PARTS))]
    closed = [
        QA(
            rng.choice(["Is there a lesion in this image?", "Does this image look abnormal?"]),
            _yes_no(has_lesion),
            "CLOSED",
            "Abnormality",
        ),
        QA("Does this image look normal?", _yes_no(not has_lesion), "CLOSED", "Abnormality"),
        QA(f"Is this {_article(other_mod)} {other_mod} scan?", _yes_no(other_mod == p.modality), "CLOSED", "Modality"),
        QA(f"Is this a scan of the {other_part.lower()}?", _yes_no(other_part == p.body_part), "CLOSED", "Organ"),
    ]
    opened = [
        QA(
            rng.choice(["What modality is used to take this image?", "Which imaging modality is this?"]),
            p.modality,
            "OPEN",
            "Modality",
        ),
        QA("Which part of the body does this image belong to?", p.body_part, "OPEN", "Organ"),
        QA("How many lesions are in this image?", str(p.lesion_count), "OPEN", "Quantity"),
        QA("Which organ is the largest in this image?", LARGEST_ORGAN[p.body_part], "OPEN", "Organ"),
    ]
    if has_lesion:
        side = rng.choice(["left", "right"])
        closed.append(
            QA(f"Is the lesion on the {side} side of the body?", _yes_no(p.lesion_side == side), "CLOSED", "Position")
        )
        opened.append(QA("Where is the lesion located?", p.lesion_organ, "OPEN", "Position"))
        if p.lesion_side:
            opened.append(
                QA("Which side of the body is the lesion on?", p.lesion_side.capitalize(), "OPEN", "Position")
            )
    n_closed = min(len(closed), per_image // 2 + int(rng.integers(0, 2)) * (per_image % 2))
    n_open = min(len(opened), per_image - n_closed)
    picks = [closed[i] for i in rng.choice(len(closed), n_closed, replace=False)]
    picks += [opened[i] for i in rng.choice(len(opened), n_open, replace=False)]
    return picks


CAPTION_PROMPTS = ("Describe this image.", "Write a short report of this scan.", "What does this image show?")


def report_text(p: Phantom) -> str:
    """A short radiology-style report of the phantom (used for captions / report generation)."""
    findings = "No lesion is seen."
    if p.lesion_count:
        noun = "lesion" if p.lesion_count == 1 else "lesions"
        findings = f"{p.lesion_count} {noun} in the {p.lesion_organ.lower()}, {p.lesion_side} side."
    return f"{p.modality} scan of the {p.body_part.lower()}. {findings}"


CLASS_PROMPT = "What is the category of this image?"


def class_label(p: Phantom) -> str:
    """Classification target: normal / abnormal and the body part, e.g. ``abnormal chest`` (6 classes)."""
    return f"{'abnormal' if p.lesion_count else 'normal'} {p.body_part.lower()}"


def text_questions(p: Phantom, rng: np.random.Generator, per_report: int = 2) -> list[QA]:
    """Text-only QA: the phantom's report is in the question, so the answer follows from the text."""
    report = report_text(p)
    return [
        QA(f"{report}\n{qa.question}", qa.answer, qa.answer_type, qa.content_type)
        for qa in phantom_questions(p, rng, per_report)
    ]
