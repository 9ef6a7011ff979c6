"""LLaVA-style conversation JSON (LLaVA-Med, Med-MoE, MedPLIB files).

    [{"id": ..., "image": "rel/path.jpg" | [..] | absent,
      "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...],
      "answer_type": "OPEN" | "CLOSED" | "open" | "close" (optional), "modality": ... (optional)}]

The misspelt key ``conversatons`` of some released files is accepted. Multi-turn conversations keep
every turn; the first turn is the record's question/answer. Every field is typed (:class:`Fields`): a null,
list, number or empty value, a question that is nothing but ``<image>``, ``<image>`` in a record without an
image, ``image: ""`` and a list of several images are bad records, never a silently text-only record.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import ProblemLog, file_error
from datamodules.readers.common import (
    MISSING,
    Fields,
    PathResolver,
    answer_type_of,
    json_type,
    load_json_list,
    record_label,
)
from datamodules.records import Record, Source, Turn

HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
IMAGE_TOKEN = "<image>"


def conversation_file(root: Path, split: str) -> Path:
    """``split`` names a JSON file in ``root`` (``train`` -> ``train.json``; a full name works too)."""
    path = root / (split if split.endswith(".json") else f"{split}.json")
    if not path.is_file():
        raise file_error(path, "<file>", f"conversation file for split {split!r} not found", "missing_file")
    return path


def available_splits(root: Path) -> list[str]:
    """Every JSON file in the folder is a split (train.json -> train)."""
    return sorted(p.stem for p in Path(root).glob("*.json"))


def conversation_messages(fields: Fields) -> list | None:
    """The record's message list (``conversations``, or the misspelt ``conversatons`` of some released files);
    None after reporting a missing, empty or non-list value."""
    key = "conversatons" if "conversations" not in fields.item and "conversatons" in fields.item else "conversations"
    convs = fields.item.get(key)
    if isinstance(convs, list) and convs:
        return convs
    reason = "missing or empty conversation" if not convs else f"expected a list of messages, got {json_type(convs)}"
    fields.report(key, reason, "missing_field" if not convs else "wrong_type")
    return None


def record_image(fields: Fields, *, required: bool) -> str | None:
    """The record's image path: a string, or a list holding one (LLaVA's multi-image form); None when the record
    has none (absent or null, allowed unless ``required``) or after reporting another type, an empty path, or
    more than one image (a record has one image: the model reads one per record)."""
    image = fields.item.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            fields.report("image", f"{len(image)} images; a record has one image", "multiple_images")
            return None
        image = image[0] if image else ""
    return fields.text("image", what="path", optional=not required, value=image)


def read_conversation(
    root: str | Path,
    split: str,
    *,
    dataset: str = "conversation",
    image_root: str | Path | None = None,
    problems: ProblemLog | None = None,
    task: str = "vqa",
    check_images: bool = True,
) -> list[Record]:
    root = Path(root)
    problems = problems or ProblemLog()
    path = conversation_file(root, split)
    images = PathResolver(Path(image_root) if image_root else root, check_exists=check_images)
    source = Source(str(path), "id", "conversations[0].value")
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        label = record_label(index, item.get("id") if isinstance(item, dict) else None)
        fields = Fields(item, file=path, record=label, problems=problems)
        rid = fields.ident("id", optional=True)
        image = record_image(fields, required=False)
        turns = parse_turns(fields, has_image=image is not None)
        modality = fields.text("modality", optional=True)
        answer_type = answer_type_of(fields, turns[0].answer if turns else "")
        if not fields.ok:
            continue
        image_path = None
        if image is not None:
            image_path = images.resolve(image, file=path, record=label, field_name="image", problems=problems)
            if image_path is None:
                continue
        records.append(
            Record(
                id=f"{dataset}/{rid if rid is not None else index}",
                dataset=dataset,
                split=split.removesuffix(".json"),
                question=turns[0].question,
                answer=turns[0].answer,
                answer_type=answer_type,
                task=task,
                modality=modality,
                image_path=image_path,
                turns=turns,
                extra={"source_id": item.get("id", index)},
                source=source,
            )
        )
    return records


def parse_turns(fields: Fields, *, has_image: bool) -> list[Turn] | None:
    """Pair human/gpt messages into turns: every message an object with a known role and a non-empty string
    ``value``; None after reporting a broken alternation, an odd count, an empty question (nothing but
    ``<image>``) or answer, a value of another type, or ``<image>`` in a record without an image."""
    convs = conversation_messages(fields)
    if convs is None:
        return None
    if len(convs) % 2:
        fields.report("conversations", f"odd number of messages ({len(convs)})", "bad_conversation")
        return None
    turns = []
    for k in range(0, len(convs), 2):
        human, gpt = convs[k], convs[k + 1]
        if (
            not (isinstance(human, dict) and isinstance(gpt, dict))
            or human.get("from") not in HUMAN_ROLES
            or gpt.get("from") not in ASSISTANT_ROLES
        ):
            fields.report(f"conversations[{k}]", "expected human/gpt alternation", "bad_conversation")
            return None
        ask, reply = f"conversations[{k}].value", f"conversations[{k + 1}].value"
        question = fields.text(ask, what="question", value=human.get("value", MISSING))
        answer = fields.text(reply, what="answer", value=gpt.get("value", MISSING))
        if not fields.ok:
            return None
        if IMAGE_TOKEN in question and not has_image:
            fields.report(ask, f"{IMAGE_TOKEN} in a record without an image", "missing_image")
            return None
        question = question.replace(IMAGE_TOKEN, "").strip()
        if not question:
            fields.report(ask, f"empty question (nothing but {IMAGE_TOKEN})", "empty_question")
            return None
        turns.append(Turn(question=question, answer=answer))
    return turns
