"""Write phantom data in MeCoVQA's layout (MedPLIB), with region prompts and grounding masks.

    ROOT/MeCoVQA-Complex.json  MeCoVQA-Region.json  MeCoVQA-Grounding.json          (train)
    ROOT/MeCoVQA_Complex_VQA_test.json  MeCoVQA_Region_VQA_test.json  MeCoVQA_Grounding_test.json
    ROOT/images/<ct|mr|x_ray>_00--Phantom--case-<N>--x_0000.png   (SA-Med2D-style names)
    ROOT/masks/<image stem>--<organ>.png               region prompts (0/1 organ masks)
    ROOT/masks_merged/<image stem>--<target>_merged.png  grounding targets (0/255)

Per image: one Complex record (two turns of phantom VQA), one Region record (which organ the
region marks, or whether it holds a lesion) and one Grounding record (segment the lesion, or an
organ when there is none). Every answer follows from the pixels and masks. MeCoVQA has no
validation split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.synthetic.phantoms import Phantom, make_phantom
from datamodules.synthetic.questions import phantom_questions

TRAIN_FILES = {
    "complex": "MeCoVQA-Complex.json",
    "region": "MeCoVQA-Region.json",
    "grounding": "MeCoVQA-Grounding.json",
}
TEST_FILES = {
    "complex": "MeCoVQA_Complex_VQA_test.json",
    "region": "MeCoVQA_Region_VQA_test.json",
    "grounding": "MeCoVQA_Grounding_test.json",
}
PREFIXES = {"CT": "ct_00", "MRI": "mr_00", "X-Ray": "x_ray"}  # SA-Med2D file-name prefixes


def image_name(p: Phantom) -> str:
    tail = "2d_none" if p.modality == "X-Ray" else "x_0000"
    return f"{PREFIXES[p.modality]}--Phantom--case-{p.index}--{tail}.png"


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def write_mecovqa(
    root: str | Path, *, n_train: int = 240, n_test: int = 60, seed: int = 0, size: int = 128
) -> dict[str, int]:
    """Write both splits; returns records per split (three per image)."""
    root = Path(root)
    for folder in ("images", "masks", "masks_merged"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 19])
    counts: dict[str, int] = {}
    index = 0
    for split, n_images, files in (("train", n_train, TRAIN_FILES), ("test", n_test, TEST_FILES)):
        subsets: dict[str, list[dict]] = {name: [] for name in files}
        for _ in range(n_images):
            p = make_phantom(index, seed=seed, size=size)
            name = image_name(p)
            Image.fromarray(p.image).save(root / "images" / name)
            image = f"images/{name}"
            stem = Path(name).stem
            subsets["complex"].append(_complex(p, image, rng))
            subsets["region"].append(_region(p, image, stem, root, rng))
            subsets["grounding"].append(_grounding(p, image, stem, root, rng))
            index += 1
        for subset, records in subsets.items():
            (root / files[subset]).write_text(json.dumps(records, indent=1))
        counts[split] = sum(len(r) for r in subsets.values())
    return counts


def _complex(p: Phantom, image: str, rng: np.random.Generator) -> dict:
    first, second = phantom_questions(p, rng, 2)
    return {
        "id": f"complex-{p.index}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{first.question}"},
            {"from": "gpt", "value": first.answer},
            {"from": "human", "value": second.question},
            {"from": "gpt", "value": second.answer},
        ],
    }


def _region(p: Phantom, image: str, stem: str, root: Path, rng: np.random.Generator) -> dict:
    organs = [name for name, mask in p.organ_masks.items() if mask.any()]
    organ = organs[int(rng.integers(len(organs)))]
    mask_name = f"masks/{stem}--{_slug(organ)}.png"
    Image.fromarray(p.organ_masks[organ].astype(np.uint8)).save(root / mask_name)  # 0/1 values
    region = f"<region>{mask_name}</region>"
    if rng.random() < 0.5:
        question, answer = f"Which organ does {region} mark?", organ
    else:
        inside = p.lesion_mask is not None and bool((p.lesion_mask & p.organ_masks[organ]).any())
        question, answer = f"Is there a lesion in {region}?", "Yes" if inside else "No"
    return {
        "id": f"region-{p.index}",
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def _grounding(p: Phantom, image: str, stem: str, root: Path, rng: np.random.Generator) -> dict:
    if p.lesion_mask is not None:
        target, mask = "lesion", p.lesion_mask
    else:
        organs = [name for name, m in p.organ_masks.items() if m.any()]
        target = organs[int(rng.integers(len(organs)))]
        mask = p.organ_masks[target]
    mask_name = f"masks_merged/{stem}--{_slug(target)}_merged.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / mask_name)
    return {
        "id": f"grounding-{p.index}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\nPlease segment the {target.lower()} in this image."},
            {"from": "gpt", "value": f"Sure, it is <SEG>. <mask>{mask_name}</mask>"},
        ],
    }
