"""Write phantom data as LLaVA-style conversation JSON with an image folder.

    ROOT/train.json  validate.json  test.json   (one JSON list per split)
    ROOT/images/phantom_<N>.jpg

``kind="caption"`` writes alignment data (a report per image, LLaVA-Med alignment style);
``kind="vqa"`` writes single-turn VQA records with answer_type and modality (Med-MoE style).
``kind="cls"`` writes one classification record per image (Uni-Med ``[cls]``: normal / abnormal and
the body part); ``kind="qa"`` writes text-only records without an image (Uni-Med ``[qa]``: the report
is in the question) and no image files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic.phantoms import make_phantom
from datamodules.synthetic.questions import (
    CAPTION_PROMPTS,
    CLASS_PROMPT,
    class_label,
    phantom_questions,
    report_text,
    text_questions,
)

KINDS = ("caption", "vqa", "cls", "qa")


def write_conversation(
    root: str | Path,
    *,
    kind: str = "caption",
    n_train: int = 240,
    n_val: int = 30,
    n_test: int = 60,
    seed: int = 0,
    size: int = 128,
    questions_per_image: int = 6,
    first_index: int = 0,
) -> dict[str, int]:
    """Write the three split files and their images; returns records per split.

    Phantom ``first_index + i`` of stream ``seed`` is image ``i``, so a caption set and a SLAKE set
    written with the same seed describe the same images.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 11])
    counts: dict[str, int] = {}
    index = first_index
    for split, n_images in (("train", n_train), ("validate", n_val), ("test", n_test)):
        records = []
        for _ in range(n_images):
            p = make_phantom(index, seed=seed, size=size)
            name = f"images/phantom_{index}.jpg"
            if kind == "qa":  # text only: no image file, no image key
                for k, qa in enumerate(text_questions(p, rng, max(1, questions_per_image // 3))):
                    records.append(
                        {
                            "id": f"qa-{index}-{k}",
                            "answer_type": qa.answer_type,
                            "conversations": [
                                {"from": "human", "value": qa.question},
                                {"from": "gpt", "value": qa.answer},
                            ],
                        }
                    )
                index += 1
                continue
            Image.fromarray(p.image).convert("RGB").save(root / name, quality=95)
            if kind == "cls":
                records.append(
                    {
                        "id": f"cls-{index}",
                        "image": name,
                        "modality": p.modality,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{CLASS_PROMPT}"},
                            {"from": "gpt", "value": class_label(p)},
                        ],
                    }
                )
            elif kind == "caption":
                prompt = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
                records.append(
                    {
                        "id": f"cap-{index}",
                        "image": name,
                        "modality": p.modality,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{prompt}"},
                            {"from": "gpt", "value": report_text(p)},
                        ],
                    }
                )
            else:
                for k, qa in enumerate(phantom_questions(p, rng, questions_per_image)):
                    records.append(
                        {
                            "id": f"vqa-{index}-{k}",
                            "image": name,
                            "modality": p.modality,
                            "answer_type": qa.answer_type,
                            "conversations": [
                                {"from": "human", "value": f"<image>\n{qa.question}"},
                                {"from": "gpt", "value": qa.answer},
                            ],
                        }
                    )
            index += 1
        (root / f"{split}.json").write_text(json.dumps(records, indent=1))
        counts[split] = len(records)
    return counts
