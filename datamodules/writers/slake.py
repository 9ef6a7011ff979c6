"""Write phantom VQA data in the SLAKE 1.0 release layout.

ROOT/train.json  validate.json  test.json
ROOT/imgs/xmlab<N>/source.jpg  mask.png  detection.json  question.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic.phantoms import make_phantom
from datamodules.synthetic.questions import phantom_questions

SPLIT_FILES = {"train": "train.json", "validate": "validate.json", "test": "test.json"}
_ZH = {"Yes": "是", "No": "否"}


def write_slake(
    root: str | Path,
    *,
    n_train: int = 240,
    n_val: int = 30,
    n_test: int = 60,
    seed: int = 0,
    size: int = 128,
    questions_per_image: int = 6,
    zh_fraction: float = 0.0,
    validation_name: str = "validate.json",
) -> dict[str, int]:
    """Write a synthetic SLAKE-layout dataset; returns the number of QA records per split.

    Images differ between splits. ``zh_fraction`` adds Chinese-language copies of closed
    questions (``q_lang: zh``) so the language filter has something to filter.
    """
    root = Path(root)
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    counts: dict[str, int] = {}
    img_id = 0
    qid = 0
    for split, n_images in (("train", n_train), ("validate", n_val), ("test", n_test)):
        records = []
        for _ in range(n_images):
            p = make_phantom(img_id, seed=seed, size=size)
            img_dir = root / "imgs" / f"xmlab{img_id}"
            img_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(p.image).convert("RGB").save(img_dir / "source.jpg", quality=95)
            label = np.zeros(p.image.shape, np.uint8)
            for k, mask in enumerate(p.organ_masks.values(), start=1):
                label[mask] = k * 20
            if p.lesion_mask is not None:
                label[p.lesion_mask] = 255
            Image.fromarray(label).save(img_dir / "mask.png")
            detection = [{name: list(box)} for name, box in p.boxes().items()]
            (img_dir / "detection.json").write_text(json.dumps(detection))
            per_image = []
            for qa in phantom_questions(p, rng, questions_per_image):
                rec = {
                    "img_id": img_id,
                    "img_name": f"xmlab{img_id}/source.jpg",
                    "question": qa.question,
                    "answer": qa.answer,
                    "q_lang": "en",
                    "location": p.body_part,
                    "modality": p.modality,
                    "answer_type": qa.answer_type,
                    "base_type": "vqa",
                    "content_type": qa.content_type,
                    "triple": ["vhead", "_", "_"],
                    "qid": qid,
                }
                qid += 1
                per_image.append(rec)
                if qa.answer in _ZH and rng.random() < zh_fraction:
                    per_image.append(
                        {
                            **rec,
                            "question": "这张图片是否正常?" if "normal" in qa.question else "这是异常吗?",
                            "answer": _ZH[qa.answer],
                            "q_lang": "zh",
                            "qid": qid,
                        }
                    )
                    qid += 1
            (img_dir / "question.json").write_text(json.dumps(per_image, ensure_ascii=False))
            records.extend(per_image)
            img_id += 1
        name = validation_name if split == "validate" else SPLIT_FILES[split]
        (root / name).write_text(json.dumps(records, ensure_ascii=False, indent=1))
        counts[split] = len(records)
    return counts
