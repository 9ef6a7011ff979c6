"""Write phantom VQA data in VQA-RAD's layouts.

    original:  ROOT/VQA_RAD Dataset Public.json   ROOT/VQA_RAD Image Folder/synpic<N>.jpg
    parquet:   ROOT/data/train-00000-of-00001.parquet  ROOT/data/test-00000-of-00001.parquet

The original file mixes what the reader must normalise: count answers are JSON numbers, some
``answer_type`` values carry a trailing space or lower case, and paraphrases (``para`` /
``test_para``, linked by ``qid_linked_id``) repeat a question in other words.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic.phantoms import make_phantom
from datamodules.synthetic.questions import phantom_questions
from datamodules.writers.hub_parquet import encode_image, write_hub_parquet

ANNOTATIONS = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
LAYOUTS = ("original", "parquet")
ORGANS = {"Brain": "HEAD", "Chest": "CHEST", "Abdomen": "ABD"}
QUESTION_TYPES = {
    "Abnormality": "PRES",
    "Modality": "MODALITY",
    "Organ": "ORGAN",
    "Position": "POS",
    "Quantity": "COUNT",
    "Plane": "PLANE",
}
FIRST_SYNPIC = 50000


def write_vqa_rad(
    root: str | Path,
    *,
    layout: str = "original",
    n_train: int = 240,
    n_test: int = 60,
    seed: int = 0,
    size: int = 128,
    questions_per_image: int = 6,
    para_fraction: float = 0.25,
) -> dict[str, int]:
    """Write the dataset; returns QA pairs per split (train = freeform + para)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng([seed, 13])
    items: list[dict] = []
    images: dict[str, np.ndarray] = {}
    qid = 0
    for index in range(n_train + n_test):
        test = index >= n_train
        p = make_phantom(index, seed=seed, size=size)
        name = f"synpic{FIRST_SYNPIC + index}.jpg"
        images[name] = p.image
        for qa in phantom_questions(p, rng, questions_per_image):
            closed = qa.answer_type == "CLOSED"
            answer: object = int(qa.answer) if qa.answer.isdigit() else qa.answer  # counts are numbers
            kind = qa.answer_type if rng.random() < 0.8 else (f"{qa.answer_type} " if closed else "open")
            base = {
                "qid": qid,
                "phrase_type": "test_freeform" if test else "freeform",
                "qid_linked_id": qid,
                "image_case_url": f"https://medpix.nlm.nih.gov/case?id=synthetic-{index}",
                "image_name": name,
                "image_organ": ORGANS[p.body_part],
                "evaluation": "given",
                "question": qa.question,
                "question_rephrase": "NULL",
                "question_relation": "NULL",
                "question_frame": "NULL",
                "question_type": QUESTION_TYPES.get(qa.content_type, "OTHER"),
                "answer": answer,
                "answer_type": kind,
            }
            items.append(base)
            qid += 1
            if rng.random() < para_fraction:
                items.append(
                    {
                        **base,
                        "qid": qid,
                        "qid_linked_id": base["qid"],
                        "phrase_type": "test_para" if test else "para",
                        "question": f"Looking at this image: {qa.question[0].lower()}{qa.question[1:]}",
                    }
                )
                qid += 1
    counts = {"train": sum(not i["phrase_type"].startswith("test") for i in items)}
    counts["test"] = len(items) - counts["train"]
    if layout == "original":
        (root / IMAGE_FOLDER).mkdir(parents=True, exist_ok=True)
        for name, pixels in images.items():
            Image.fromarray(pixels).convert("RGB").save(root / IMAGE_FOLDER / name, quality=95)
        (root / ANNOTATIONS).write_text(json.dumps(items, indent=1))
        return counts
    encoded = {name: encode_image(pixels) for name, pixels in images.items()}
    for split in ("train", "test"):
        rows = [
            {
                "image": {"bytes": encoded[i["image_name"]], "path": i["image_name"]},
                "question": i["question"],
                "answer": str(i["answer"]),
            }
            for i in items
            if i["phrase_type"].startswith("test") == (split == "test")
        ]
        write_hub_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    return counts
