"""LLaVA-style conversation JSON (LLaVA-Med, Med-MoE, MedPLIB files).

    [{"id": ..., "image": "rel/path.jpg" | [..] | absent,
      "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...],
      "answer_type": "OPEN" | "CLOSED" | "open" | "close" (optional), "modality": ... (optional)}]

The misspelt key ``conversatons`` of some released files is accepted. Multi-turn conversations keep
every turn; the first turn is the record's question/answer.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import DataError, ProblemLog
from datamodules.readers.common import load_json_list, resolve_inside
from datamodules.records import Record, Turn, closed_if_yes_no

ANSWER_TYPE_ALIASES = {"open": "open", "closed": "closed", "close": "closed", "yes/no": "closed", "other": "open"}
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def conversation_file(root: Path, split: str) -> Path:
    """``split`` names a JSON file in ``root`` (``train`` -> ``train.json``; a full name works too)."""
    path = root / (split if split.endswith(".json") else f"{split}.json")
    if not path.is_file():
        raise DataError(f"{path}: conversation file for split {split!r} not found")
    return path


def read_conversation(root: str | Path, split: str, *, dataset: str = "conversation",
                      image_root: str | Path | None = None, problems: ProblemLog | None = None,
                      task: str = "vqa", check_images: bool = True) -> list[Record]:
    root = Path(root)
    problems = problems or ProblemLog()
    path = conversation_file(root, split)
    images = Path(image_root) if image_root else root
    records: list[Record] = []
    for index, item in enumerate(load_json_list(path)):
        if not isinstance(item, dict):
            problems.report(path, index, "<record>", f"expected an object, got {type(item).__name__}",
                            "not_an_object")
            continue
        rid = f"{dataset}/{item.get('id', index)}"
        convs = item.get("conversations", item.get("conversatons"))
        if not isinstance(convs, list) or not convs:
            problems.report(path, rid, "conversations", "missing or empty conversation", "missing_field")
            continue
        turns = _turns(convs, path, rid, problems)
        if turns is None:
            continue
        image_path = None
        image = item.get("image")
        if isinstance(image, list):  # multi-image records: the first image is the one we use
            image = image[0] if image else None
        if image:
            resolved = resolve_inside(images, str(image), path, rid, "image", problems, check_exists=check_images)
            if resolved is None:
                continue
            image_path = str(resolved)
        raw_type = item.get("answer_type")
        if raw_type is None:
            answer_type = closed_if_yes_no(turns[0].answer)
        elif str(raw_type).strip().lower() in ANSWER_TYPE_ALIASES:
            answer_type = ANSWER_TYPE_ALIASES[str(raw_type).strip().lower()]
        else:
            problems.report(path, rid, "answer_type", f"unknown answer_type {raw_type!r}", "unknown_answer_type")
            continue
        records.append(Record(id=rid, dataset=dataset, split=split.removesuffix(".json"),
                              question=turns[0].question, answer=turns[0].answer, answer_type=answer_type,
                              task=task, modality=item.get("modality"), image_path=image_path, turns=turns,
                              extra={"source_id": item.get("id", index)}))
    return records


def _turns(convs: list, path: Path, rid: str, problems: ProblemLog) -> list[Turn] | None:
    """Pair human/gpt messages into turns; a broken alternation or empty answer is a bad record."""
    if len(convs) % 2:
        problems.report(path, rid, "conversations", f"odd number of messages ({len(convs)})", "bad_conversation")
        return None
    turns = []
    for k in range(0, len(convs), 2):
        human, gpt = convs[k], convs[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or human.get("from") not in HUMAN_ROLES \
                or gpt.get("from") not in ASSISTANT_ROLES:
            problems.report(path, rid, f"conversations[{k}]", "expected human/gpt alternation", "bad_conversation")
            return None
        question, answer = str(human.get("value", "")), str(gpt.get("value", "")).strip()
        if not answer:
            problems.report(path, rid, f"conversations[{k + 1}].value", "empty answer", "empty_answer")
            return None
        turns.append(Turn(question=question.replace("<image>", "").strip(), answer=answer))
    return turns
