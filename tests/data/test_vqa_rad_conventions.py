"""VQA-RAD split conventions (``data.datasets.<name>.convention``): LLaVA-Med's freeform / para split and MEVF's
3,515-pair split (framed questions as further train pairs, test questions' frames included), on a synthetic
``VQA_RAD Dataset Public.json`` in the release layout, with every expectation counted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.problems import DataError, ProblemLog
from datamodules.readers import read_split
from datamodules.readers.vqa_rad import read_vqa_rad
from datamodules.specs import DatasetSpec, SyntheticSpec

IMAGES = ("synpic1.jpg", "synpic2.jpg")


def item(qid: int, phrase: str, frame: str | None = "NULL", *, answer: object = "Yes", image: str = "synpic1.jpg"):
    """A record with every field of the public JSON; ``frame=None`` leaves ``question_frame`` out."""
    record = {
        "qid": qid,
        "phrase_type": phrase,
        "qid_linked_id": qid,
        "image_case_url": "u",
        "image_name": image,
        "image_organ": "CHEST",
        "evaluation": "given",
        "question": f"q{qid}?",
        "question_rephrase": "NULL",
        "question_relation": "NULL",
        "question_frame": frame,
        "question_type": "PRES",
        "answer": answer,
        "answer_type": "CLOSED",
    }
    if frame is None:
        del record["question_frame"]
    return record


def write_release(root: Path, items: list[dict]) -> Path:
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    for name in IMAGES:
        Image.new("RGB", (8, 8)).save(root / "VQA_RAD Image Folder" / name)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    return root


# 6 clean records: 4 train (freeform / para), 2 test; 4 non-NULL frames, 2 of them on test questions
CLEAN = [
    item(10, "freeform", "Is/Are there a rib fracture?"),
    item(11, "freeform"),
    item(12, "para", "Is/Are the lungs normal size?", answer=3, image="synpic2.jpg"),
    item(13, "para"),
    item(14, "test_freeform", "Is/Are there a pneumothorax?", answer="no"),
    item(15, "test_para", "Is/Are the heart enlarged?", image="synpic2.jpg"),
]


@pytest.fixture
def clean_root(tmp_path: Path) -> Path:
    return write_release(tmp_path / "vqa_rad", CLEAN)


def ids(records) -> list[str]:
    return [r.id for r in records]


def test_freeform_para_is_one_pair_per_record(clean_root: Path) -> None:
    train = read_vqa_rad(clean_root, "train")  # the default convention
    test = read_vqa_rad(clean_root, "test", convention="freeform_para")
    assert ids(train) == ["vqa_rad/10", "vqa_rad/11", "vqa_rad/12", "vqa_rad/13"]  # 4 train records
    assert ids(test) == ["vqa_rad/14", "vqa_rad/15"]  # 2 test records
    assert all(r.extra["phrase_type"] != "frame" for r in train + test)


def test_mevf_adds_every_frame_to_train(clean_root: Path) -> None:
    train = read_vqa_rad(clean_root, "train", convention="mevf")
    test = read_vqa_rad(clean_root, "test", convention="mevf")
    # 4 records + 4 frames (2 of train records, 2 of test records) = 8; test unchanged: 2; 10 pairs in all
    assert ids(train) == [
        "vqa_rad/10",
        "vqa_rad/10_frame",
        "vqa_rad/11",
        "vqa_rad/12",
        "vqa_rad/12_frame",
        "vqa_rad/13",
        "vqa_rad/14_frame",
        "vqa_rad/15_frame",
    ]
    assert ids(test) == ["vqa_rad/14", "vqa_rad/15"]
    frames = {r.id: r for r in train if r.extra["phrase_type"] == "frame"}
    pneumothorax = frames["vqa_rad/14_frame"]  # a test question's frame: its image and answer, in train
    assert (pneumothorax.question, pneumothorax.answer, pneumothorax.split) == (
        "Is/Are there a pneumothorax?",
        "no",
        "train",
    )
    assert pneumothorax.image_path == test[0].image_path
    assert pneumothorax.extra["source_phrase_type"] == "test_freeform"
    assert frames["vqa_rad/12_frame"].answer == "3"  # answers cast to str, as the record's
    assert frames["vqa_rad/15_frame"].image_path.endswith("synpic2.jpg")
    assert {r.answer_type for r in frames.values()} == {"closed"}
    assert [r.extra["source_phrase_type"] for r in frames.values()] == [
        "freeform",
        "para",
        "test_freeform",
        "test_para",
    ]


def test_the_convention_reaches_the_reader_from_the_spec(clean_root: Path) -> None:
    def count(convention: str | None, split: str) -> int:
        spec = DatasetSpec(format="vqa_rad", path=str(clean_root), val_split=None, convention=convention)
        return len(read_split(spec, "rad", split, ProblemLog()))

    assert (count(None, "train"), count(None, "test")) == (4, 2)
    assert (count("freeform_para", "train"), count("freeform_para", "test")) == (4, 2)
    assert (count("mevf", "train"), count("mevf", "test")) == (8, 2)


BAD = [
    item(20, "freeform", "Is/Are there a mass?"),  # fine: 2 train pairs under mevf
    item(21, "freeform", "   "),  # empty frame: reported, its own pair kept
    item(22, "freeform", "Is/Are there an effusion?", answer="  "),  # empty answer: record and frame dropped
    item(23, "test_freeform", "Is/Are there a fracture?", image="synpic9.jpg"),  # missing image: both dropped
    item(24, "frame", "Is/Are there air?"),  # unknown phrase_type: dropped
    item(25, "para", None),  # no question_frame field: dropped under mevf (train), kept otherwise
    item(26, "test_para"),  # fine
]


def test_bad_records_are_counted_per_convention(tmp_path: Path) -> None:
    root = write_release(tmp_path / "vqa_rad", BAD)

    problems = ProblemLog("skip")
    train = read_vqa_rad(root, "train", problems=problems)
    test = read_vqa_rad(root, "test", problems=problems)
    assert ids(train) == ["vqa_rad/20", "vqa_rad/21", "vqa_rad/25"]
    assert ids(test) == ["vqa_rad/26"]
    # 22 (train) empty answer, 23 (test) missing image, 24 unknown phrase_type (reported once for both reads)
    assert problems.counts() == {"empty_answer": 1, "missing_image": 1, "unknown_phrase_type": 1}

    problems = ProblemLog("skip")
    train = read_vqa_rad(root, "train", problems=problems, convention="mevf")
    test = read_vqa_rad(root, "test", problems=problems, convention="mevf")
    assert ids(train) == ["vqa_rad/20", "vqa_rad/20_frame", "vqa_rad/21"]
    assert ids(test) == ["vqa_rad/26"]
    assert problems.counts() == {
        "empty_question": 1,  # 21's frame
        "empty_answer": 1,  # 22
        "missing_image": 1,  # 23: its frame would be a train pair, its question a test pair
        "unknown_phrase_type": 1,  # 24
        "missing_field": 1,  # 25's question_frame
    }
    by_record = {p.record: p.field for p in problems.problems}
    assert by_record["1 (id 21)"] == "question_frame" and by_record["5 (id 25)"] == "question_frame"


def test_an_empty_frame_stops_the_read_by_default(tmp_path: Path) -> None:
    root = write_release(tmp_path / "vqa_rad", [item(30, "freeform", "")])
    assert ids(read_vqa_rad(root, "train")) == ["vqa_rad/30"]  # freeform_para never reads the frame
    with pytest.raises(DataError, match="record 0 \\(id 30\\): field 'question_frame': empty framed question"):
        read_vqa_rad(root, "train", convention="mevf")


def test_mevf_needs_the_original_release(vqa_rad_parquet) -> None:
    root, counts = vqa_rad_parquet
    assert len(read_vqa_rad(root, "train", convention="freeform_para")) == counts["train"]
    with pytest.raises(DataError, match="hub parquet export does not have"):
        read_vqa_rad(root, "train", convention="mevf")
    with pytest.raises(DataError, match="unknown VQA-RAD split convention 'framed'"):
        read_vqa_rad(root, "train", convention="framed")


def test_spec_checks_the_convention() -> None:
    def problems(**options) -> list[tuple[str, str]]:
        return DatasetSpec(path="/x", val_split=None, **options).problems("data.datasets.d")

    assert problems(format="vqa_rad", convention="mevf") == []
    assert problems(format="vqa_rad") == []
    assert problems(format="vqa_rad", convention="framed") == [
        ("data.datasets.d.convention", "'framed' is not one of freeform_para, mevf")
    ]
    assert problems(format="slake", convention="freeform_para")[0] == (
        "data.datasets.d.convention",
        "slake has no split conventions (only vqa_rad has: set null)",
    )
    parquet = SyntheticSpec(layout="parquet")
    assert problems(format="vqa_rad", convention="mevf", synthetic=parquet) == [
        ("data.datasets.d.convention", "mevf needs question_frame: the hub parquet export has none")
    ]
