"""Write each release layout from phantoms, read it back: exact counts and fields."""

from __future__ import annotations

import ast
import io
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.problems import ProblemLog
from datamodules.readers import read_split
from datamodules.readers.conversation import read_conversation
from datamodules.readers.mecovqa import read_mecovqa
from datamodules.readers.pathvqa import read_pathvqa
from datamodules.readers.slake import read_slake
from datamodules.readers.vqa_rad import read_vqa_rad
from datamodules.records import closed_if_yes_no
from datamodules.specs import DatasetSpec, SyntheticSpec
from datamodules.writers import COMPLETE_MARKER, ensure_synthetic


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def test_vqa_rad_original_round_trip(vqa_rad_original) -> None:
    root, counts = vqa_rad_original
    items = {i["qid"]: i for i in read_json(root / "VQA_RAD Dataset Public.json")}
    for split in ("train", "test"):
        records = read_vqa_rad(root, split)
        assert len(records) == counts[split] > 0
        for r in records:
            raw = items[int(r.id.split("/")[1])]
            assert r.dataset == "vqa_rad" and r.split == split
            assert r.question == raw["question"] and r.answer == str(raw["answer"]).strip()
            assert r.answer_type == raw["answer_type"].strip().lower()
            assert Path(r.image_path) == root / "VQA_RAD Image Folder" / raw["image_name"]
            assert r.extra["phrase_type"] == raw["phrase_type"]
    # the writer stores counts as JSON numbers and some answer types with a trailing space / lower case
    assert any(isinstance(i["answer"], int) for i in items.values())
    assert any(i["answer_type"] != i["answer_type"].strip().upper() for i in items.values())


def test_vqa_rad_parquet_round_trip(vqa_rad_parquet, vqa_rad_original) -> None:
    root, counts = vqa_rad_parquet
    for split in ("train", "test"):
        records = read_vqa_rad(root, split)
        original = read_vqa_rad(vqa_rad_original[0], split)
        assert len(records) == counts[split] == len(original)
        assert [r.id for r in records] == [f"vqa_rad/{split}/{k}" for k in range(len(records))]
        assert [(r.question, r.answer) for r in records] == [(r.question, r.answer) for r in original]
        for r in records:
            assert r.image_path is None and r.image_bytes
            assert r.answer_type == ("closed" if r.answer.lower() in ("yes", "no") else "open")
            assert Image.open(io.BytesIO(r.image_bytes)).size == (32, 32)
        # one bytes object per distinct image, shared by that image's questions
        assert len({id(r.image_bytes) for r in records}) == len({r.extra["image_name"] for r in records})


def test_slake_round_trip(slake_small) -> None:
    root, counts = slake_small
    assert (root / "validation.json").is_file() and not (root / "validate.json").exists()
    for split in ("train", "validate", "test"):
        file = root / ("validation.json" if split == "validate" else f"{split}.json")
        raw = {i["qid"]: i for i in read_json(file)}
        assert len(raw) == counts[split]
        records = read_slake(root, split, languages=("en", "zh"))
        assert len(records) == counts[split]
        for r in records:
            item = raw[int(r.id.split("/")[1])]
            assert (r.question, r.answer, r.modality) == (item["question"], item["answer"], item["modality"])
            assert r.answer_type == item["answer_type"].lower()
            assert Path(r.image_path) == root / "imgs" / item["img_name"]
            assert r.extra["q_lang"] == item["q_lang"]


def test_pathvqa_parquet_round_trip(pathvqa_parquet) -> None:
    root, counts = pathvqa_parquet
    assert set(counts) == {"train", "validation", "test"}
    for split in ("train", "validation", "test"):
        records = read_pathvqa(root, split)
        assert len(records) == counts[split] > 0
        assert all(r.answer_type == closed_if_yes_no(r.answer) for r in records)
    assert len(read_pathvqa(root, "val")) == counts["validation"]  # alias


def test_pathvqa_pickle_round_trip(pathvqa_pickle) -> None:
    root, counts = pathvqa_pickle
    with open(root / "qas" / "train_vqa.pkl", "rb") as f:
        raw = pickle.load(f)  # our own file, written by the test fixture
    records = read_pathvqa(root, "train", allow_pickle=True)
    assert len(records) == counts["train"] == len(raw)
    for r, item in zip(records, raw, strict=True):
        assert r.id == f"pathvqa/{item['question_id']}" and r.question == item["sent"]
        assert r.answer == next(iter(item["label"]))
        assert r.answer_type == ("closed" if item["answer_type"] == "yes/no" else "open")
        assert Path(r.image_path) == root / "images" / "train" / f"{item['img_id']}.jpg"
    # the folder that contains pvqa/ works too, and val is the release's name for validation
    assert len(read_pathvqa(root.parent, "validation", allow_pickle=True)) == counts["val"]


def test_conversation_round_trip(conversation_small) -> None:
    root, counts = conversation_small
    raw = read_json(root / "train.json")
    records = read_conversation(root, "train")
    assert len(records) == counts["train"] == len(raw)
    for r, item in zip(records, raw, strict=True):
        assert r.id == f"conversation/{item['id']}" and r.modality == item["modality"]
        assert r.question == item["conversations"][0]["value"].removeprefix("<image>\n")
        assert r.answer == item["conversations"][1]["value"]
        assert r.answer_type == item["answer_type"].lower()


def test_conversation_multi_turn_and_typo(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.json").write_text("""[
      {"id": "m1", "image": "a.png", "conversatons": [
        {"from": "human", "value": "<image>\\nIs it CT?"}, {"from": "gpt", "value": "Yes"},
        {"from": "human", "value": "Which organ?"}, {"from": "gpt", "value": "Liver"}]},
      {"id": "m2", "conversations": [{"from": "human", "value": "Say no"}, {"from": "gpt", "value": "No"}],
       "answer_type": "close"}]""")
    first, second = read_conversation(tmp_path, "train")
    assert [(t.question, t.answer) for t in first.turns] == [("Is it CT?", "Yes"), ("Which organ?", "Liver")]
    assert (first.question, first.answer, first.answer_type) == ("Is it CT?", "Yes", "closed")
    assert second.image_path is None and second.answer_type == "closed"


def test_mecovqa_round_trip(mecovqa_small) -> None:
    root, counts = mecovqa_small
    for split, per_image in (("train", 6), ("test", 3)):
        records = read_mecovqa(root, split)
        assert len(records) == counts[split] == 3 * per_image
        by_task = Counter(r.task for r in records)
        assert by_task == {"vqa": per_image, "region": per_image, "grounding": per_image}
        for r in records:
            prefix = Path(r.image_path).name.split("_", 1)[0]
            assert r.modality == {"ct": "CT", "mr": "MRI", "x": "X-ray"}[prefix]
            if r.task == "vqa":
                assert len(r.turns) == 2 and r.mask_path is None and r.region is None
            if r.task == "region":
                assert "<region></region>" in r.question and "masks/" not in r.question
                assert Path(r.region).parent == root / "masks" and Path(r.region).is_file()
            if r.task == "grounding":
                assert r.answer == "Sure, it is <SEG>." and "<mask>" not in r.answer
                assert Path(r.mask_path).parent == root / "masks_merged"
                mask = np.asarray(Image.open(r.mask_path))
                assert mask.shape == (32, 32) and mask.max() == 255
    assert len(read_mecovqa(root, "train", subsets=["grounding"])) == 6


@pytest.mark.parametrize(
    "fmt, layout, splits",
    [
        ("vqa_rad", "original", ("train", "test")),
        ("vqa_rad", "parquet", ("train", "test")),
        ("slake", "validation", ("train", "validate", "test")),
        ("pathvqa", "parquet", ("train", "validation", "test")),
        ("conversation", None, ("train", "validate", "test")),
        ("mecovqa", None, ("train", "test")),
    ],
)
def test_ensure_synthetic_writes_every_format(tmp_path: Path, fmt: str, layout: str | None, splits) -> None:
    spec = DatasetSpec(
        format=fmt,
        path=str(tmp_path / fmt),
        synthetic=SyntheticSpec(
            layout=layout, train_images=3, val_images=2, test_images=2, questions_per_image=2, image_size=32
        ),
    )
    assert ensure_synthetic(spec) is True
    assert (tmp_path / fmt / COMPLETE_MARKER).is_file()
    assert ensure_synthetic(spec) is False  # written once
    counts = ast.literal_eval((tmp_path / fmt / COMPLETE_MARKER).read_text())  # the marker records the counts
    assert set(counts) >= set(splits)
    for split in splits:
        records = read_split(spec, fmt, split, ProblemLog())
        assert len(records) == counts[split] > 0
