"""Per-task prompt templates (Uni-Med / MiniGPT-v2 style instructions).

Each task has a few phrasings of its instruction. Training draws one at random per sample (so the
model does not tie a task to one wording); evaluation always uses the first, so scores are
reproducible. A template names the fields it needs:

- ``{question}``: the record's own question (VQA, text-only QA);
- ``{object}``: the referred object of a referring-expression record (``record.extra["organ"]``);
- ``{box}``: the ``{<x1><y1><x2><y2>}`` box in the record's question (referring expression
  generation, the box is in the prompt).

A template whose field the record lacks is not used for it; a record with no usable template keeps
its question. Tasks without templates (region, grounding) keep their questions.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string

from datamodules.records import Record, Turn

BOX_IN_TEXT = re.compile(r"\{<\d+><\d+><\d+><\d+>\}")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "vqa": (
        "{question}",
        "Based on the image, respond to this question with a short answer: {question}",
        "Answer this question about the scan: {question}",
    ),
    "refer": ("Where is the {object}?", "Give me the location of the {object}.", "Find the {object} in this image."),
    "identify": (
        "What is in {box}?",
        "What object is in this part of the image {box}?",
        "Identify the object at {box}.",
    ),
    "caption": ("Describe this image.", "Write a short report of this scan.", "What does this image show?"),
    "cls": ("What is the category of this image?", "Classify this image.", "Which class does this scan belong to?"),
    "qa": ("{question}", "Answer the question: {question}", "Please answer: {question}"),
}


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def record_fields(record: Record) -> dict[str, str]:
    """The template fields this record can fill."""
    fields = {"question": record.question}
    organ = record.extra.get("organ") if record.extra else None
    if organ:
        fields["object"] = str(organ).lower()
    box = BOX_IN_TEXT.search(record.question)
    if box:
        fields["box"] = box.group(0)
    return fields


class PromptTemplates:
    """Rewrites a record's first question with one of its task's templates."""

    def __init__(self, templates: dict[str, tuple[str, ...]] | None = None) -> None:
        self.templates = dict(TEMPLATES if templates is None else templates)
        for task, options in self.templates.items():
            if not options:
                raise ValueError(f"prompt templates for task {task!r} are empty")

    def usable(self, record: Record) -> list[str]:
        fields = record_fields(record)
        return [t for t in self.templates.get(record.task, ()) if template_fields(t) <= fields.keys()]

    def render(self, record: Record, rng: random.Random | None = None) -> str:
        """The first usable template (``rng=None``: evaluation) or a random one (training)."""
        options = self.usable(record)
        if not options:
            return record.question
        template = options[0] if rng is None else options[rng.randrange(len(options))]
        return template.format(**record_fields(record))

    def apply(self, record: Record, rng: random.Random | None = None) -> Record:
        """A copy of ``record`` whose first turn asks the templated question (answers unchanged)."""
        return self._asking(record, self.render(record, rng))

    def variants(self, record: Record, *, every: bool) -> list[Record]:
        """``record`` as evaluation asks it (the first usable template), or with ``every`` as each template a
        training draw may pick."""
        options = self.usable(record) if every else []
        if not options:
            return [self.apply(record)]
        fields = record_fields(record)
        return [self._asking(record, template.format(**fields)) for template in options]

    @staticmethod
    def _asking(record: Record, question: str) -> Record:
        if question == record.question:
            return record
        turns = [Turn(question, record.turns[0].answer), *record.turns[1:]]
        return dataclasses.replace(record, question=question, turns=turns)
