"""Write phantom VQA data in PathVQA's layouts.

parquet:  ROOT/data/{train,validation,test}-00000-of-00001.parquet
pickle:   ROOT/images/{train,val,test}/<img_id>.jpg   (ROOT is the release's pvqa/ folder)
          ROOT/qas/{split}_vqa.pkl   ROOT/qas/{split}/{split}_qa.pkl
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic.phantoms import make_phantom
from datamodules.synthetic.questions import phantom_questions
from datamodules.writers.hub_parquet import encode_image, write_hub_parquet

LAYOUTS = ("parquet", "pickle")
SPLITS = {"parquet": ("train", "validation", "test"), "pickle": ("train", "val", "test")}


def write_pathvqa(
    root: str | Path,
    *,
    layout: str = "parquet",
    n_train: int = 240,
    n_val: int = 30,
    n_test: int = 60,
    seed: int = 0,
    size: int = 128,
    questions_per_image: int = 6,
) -> dict[str, int]:
    """Write the dataset; returns QA pairs per split (named as in the layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    rng = np.random.default_rng([seed, 17])
    counts: dict[str, int] = {}
    index = 0
    question_id = 0
    for split, n_images in zip(SPLITS[layout], (n_train, n_val, n_test), strict=True):
        vqa, qa_rows, rows = [], [], []
        for _ in range(n_images):
            p = make_phantom(index, seed=seed, size=size)
            img_id = f"{split}_{index:04d}"
            if layout == "pickle":
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(p.image).convert("RGB").save(root / "images" / split / f"{img_id}.jpg", quality=95)
            else:
                data = encode_image(p.image)
            for qa in phantom_questions(p, rng, questions_per_image):
                closed = qa.answer_type == "CLOSED"
                answer = qa.answer.lower() if closed else qa.answer
                vqa.append(
                    {
                        "answer_type": "yes/no" if closed else "other",
                        "img_id": img_id,
                        "label": {answer: 1},
                        "question_id": question_id,
                        "question_type": qa.content_type.lower(),
                        "sent": qa.question,
                    }
                )
                qa_rows.append({"image": img_id, "question": qa.question, "answer": answer})
                if layout == "parquet":
                    rows.append(
                        {"image": {"bytes": data, "path": f"{img_id}.jpg"}, "question": qa.question, "answer": answer}
                    )
                question_id += 1
            index += 1
        if layout == "pickle":
            (root / "qas" / split).mkdir(parents=True, exist_ok=True)
            with open(root / "qas" / f"{split}_vqa.pkl", "wb") as f:
                pickle.dump(vqa, f, protocol=4)
            with open(root / "qas" / split / f"{split}_qa.pkl", "wb") as f:
                pickle.dump(qa_rows, f, protocol=4)
        else:
            write_hub_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
        counts[split] = len(vqa)
    return counts
