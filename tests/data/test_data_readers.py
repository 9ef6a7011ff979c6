"""Format rules: VQA-RAD's phrase_type split and hub detection, SLAKE's language filter and boxes,
PathVQA's pickle refusal and opt-in, MeCoVQA's region / mask tags and modality prefixes."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.problems import DataError
from datamodules.readers.mecovqa import modality_of, read_mecovqa
from datamodules.readers.pathvqa import read_pathvqa
from datamodules.readers.slake import read_slake
from datamodules.readers.vqa_rad import read_vqa_rad

# -- VQA-RAD ----------------------------------------------------------------------------------------


def vqa_rad_item(qid: int, phrase: str, *, answer: object = "Yes", kind: str = "CLOSED", image: str = "synpic1.jpg"):
    return {
        "qid": qid,
        "phrase_type": phrase,
        "qid_linked_id": qid,
        "image_case_url": "u",
        "image_name": image,
        "image_organ": "HEAD",
        "evaluation": "given",
        "question": f"q{qid}?",
        "question_rephrase": "NULL",
        "question_relation": "NULL",
        "question_frame": "NULL",
        "question_type": "PRES",
        "answer": answer,
        "answer_type": kind,
    }


@pytest.fixture
def vqa_rad_root(tmp_path: Path) -> Path:
    (tmp_path / "VQA_RAD Image Folder").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    items = [
        vqa_rad_item(0, "freeform"),
        vqa_rad_item(1, "para", answer=2, kind="OPEN"),
        vqa_rad_item(2, "test_freeform", kind="CLOSED "),
        vqa_rad_item(3, "test_para", answer="no", kind="closed"),
        vqa_rad_item(4, "freeform", answer="axial", kind=" open"),
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(items))
    return tmp_path


def test_vqa_rad_splits_by_phrase_type(vqa_rad_root: Path) -> None:
    train = read_vqa_rad(vqa_rad_root, "train")
    test = read_vqa_rad(vqa_rad_root, "test")
    assert [r.id for r in train] == ["vqa_rad/0", "vqa_rad/1", "vqa_rad/4"]
    assert [r.id for r in test] == ["vqa_rad/2", "vqa_rad/3"]
    assert [r.answer for r in train] == ["Yes", "2", "axial"]  # answers cast to str
    assert [r.answer_type for r in train] == ["closed", "open", "open"]  # strip + upper
    assert [r.answer_type for r in test] == ["closed", "closed"]


def test_vqa_rad_has_no_validation_split(vqa_rad_root: Path) -> None:
    with pytest.raises(DataError, match="val_split: null"):
        read_vqa_rad(vqa_rad_root, "validate")


def test_vqa_rad_layout_detection(tmp_path: Path, vqa_rad_parquet) -> None:
    with pytest.raises(DataError, match="not a VQA-RAD folder"):
        read_vqa_rad(tmp_path, "train")
    root, counts = vqa_rad_parquet
    assert not (root / "VQA_RAD Dataset Public.json").exists()
    assert len(read_vqa_rad(root, "test")) == counts["test"]


def test_vqa_rad_parquet_shards_with_hash_suffixes(tmp_path: Path) -> None:
    from datamodules.writers.hub_parquet import encode_image, write_hub_parquet

    data = encode_image(np.zeros((4, 4), np.uint8))
    rows = [{"image": {"bytes": data, "path": "a.jpg"}, "question": f"q{i}", "answer": "yes"} for i in range(3)]
    write_hub_parquet(tmp_path / "data" / "train-00001-of-00002-9f8e.parquet", rows[2:])
    write_hub_parquet(tmp_path / "data" / "train-00000-of-00002-1a2b.parquet", rows[:2])
    records = read_vqa_rad(tmp_path, "train")
    assert [r.question for r in records] == ["q0", "q1", "q2"]  # shards in name order, ids over shards
    assert [r.id for r in records] == ["vqa_rad/train/0", "vqa_rad/train/1", "vqa_rad/train/2"]


# -- SLAKE ------------------------------------------------------------------------------------------


def test_slake_language_filter(slake_small) -> None:
    root, counts = slake_small
    raw = json.loads((root / "train.json").read_text())
    langs = [item["q_lang"] for item in raw]
    assert langs.count("zh") > 0 and langs.count("en") > 0
    en = read_slake(root, "train")
    zh = read_slake(root, "train", languages=("zh",))
    both = read_slake(root, "train", languages=("en", "zh"))
    assert len(en) == langs.count("en") and {r.extra["q_lang"] for r in en} == {"en"}
    assert len(zh) == langs.count("zh") and {r.extra["q_lang"] for r in zh} == {"zh"}
    assert len(both) == len(raw) == counts["train"]


def test_slake_validation_file_names(slake_small, tmp_path: Path) -> None:
    root, counts = slake_small
    for split in ("validate", "validation", "val"):
        assert len(read_slake(root, split, languages=("en", "zh"))) == counts["validate"]
    with pytest.raises(DataError, match="validate.json or validation.json"):
        read_slake(tmp_path, "validate")


def test_slake_refer_and_identify_boxes(slake_small) -> None:
    from medcore.boxes import parse_box

    root, _ = slake_small
    qa = read_slake(root, "test")
    refer = read_slake(root, "test", task="refer")
    identify = read_slake(root, "test", task="identify")
    images = sorted({r.image_path for r in qa})
    expected = sum(len(json.loads((Path(p).parent / "detection.json").read_text())) for p in images)
    assert len(refer) == len(identify) == expected > 0
    for r, i in zip(refer, identify, strict=True):
        ((organ, (x, y, w, h)),) = json.loads((Path(r.image_path).parent / "detection.json").read_text())[
            int(r.id.rsplit("/", 1)[1])
        ].items()
        assert r.task == "refer" and i.task == "identify" and r.box == i.box == (x, y, w, h)
        assert r.question == f"Where is the {organ.lower()}?" and i.answer == organ
        size = 32  # the fixture's image size: boxes are on Uni-Med's 0..100 grid
        assert parse_box(r.answer) == (
            round(x / size * 100),
            round(y / size * 100),
            round((x + w) / size * 100),
            round((y + h) / size * 100),
        )
        assert i.question == f"What is in {r.answer}?"


# -- PathVQA ----------------------------------------------------------------------------------------


def test_pathvqa_pickle_refused_without_opt_in(pathvqa_pickle) -> None:
    root, _ = pathvqa_pickle
    with pytest.raises(DataError) as info:
        read_pathvqa(root, "train")
    message = str(info.value)
    assert "train_vqa.pkl" in message and "executes code" in message and "allow_pickle: true" in message
    assert info.value.problem.kind == "pickle_refused"


def test_pathvqa_pickle_opt_in_reads(pathvqa_pickle) -> None:
    root, counts = pathvqa_pickle
    for split in ("train", "val", "test"):
        assert len(read_pathvqa(root, split, allow_pickle=True)) == counts[split]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pathvqa_opt_in_still_refuses_code(tmp_path: Path) -> None:
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps([_Exploit()]))
    with pytest.raises(DataError, match=r"refusing to load (posix|os|nt)\.system"):
        read_pathvqa(tmp_path, "train", allow_pickle=True)


def test_pathvqa_qa_pickle_when_vqa_pickle_is_absent(pathvqa_pickle, tmp_path: Path) -> None:
    import shutil

    from datamodules.readers.pathvqa import available_splits

    root = tmp_path / "pvqa"
    shutil.copytree(pathvqa_pickle[0], root)
    full = read_pathvqa(root, "test", allow_pickle=True)
    (root / "qas" / "test_vqa.pkl").unlink()
    assert available_splits(root) == ["train", "val", "test"]
    with pytest.raises(DataError, match=r"test_qa.pkl is a Python pickle: loading it executes code"):
        read_pathvqa(root, "test")
    records = read_pathvqa(root, "test", allow_pickle=True)
    assert len(records) == len(full) == pathvqa_pickle[1]["test"]
    assert [r.id for r in records] == [f"pathvqa/test/{k}" for k in range(len(full))]
    assert [(r.question, r.answer, r.answer_type, r.image_path) for r in records] == [
        (r.question, r.answer, r.answer_type, r.image_path) for r in full
    ]


def test_pathvqa_parquet_needs_no_opt_in(pathvqa_parquet) -> None:
    root, counts = pathvqa_parquet
    assert len(read_pathvqa(root, "test")) == counts["test"]


# -- MeCoVQA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, modality",
    [
        ("images/ct_00--CT_ORG--volume-1--x_0083.png", "CT"),
        ("mr_00--BraTS--x_0001.png", "MRI"),
        ("x_ray--Chest_Image_Pneum--1.2.276--2d_none.png", "X-ray"),
        ("ultrasound_00--nerve--19_3--2d_none.png", "ultrasound"),
        ("pet_00--a.png", "PET"),
        ("fundus_00--a.png", "fundus"),
        ("dermoscopy_00--a.png", "dermoscopy"),
        ("endoscopy_00--a.png", "endoscopy"),
        ("oct_00--a.png", "oct"),
    ],
)
def test_mecovqa_modality_from_prefix(name: str, modality: str) -> None:
    assert modality_of(name) == modality


def test_mecovqa_region_and_mask_tags(tmp_path: Path) -> None:
    for folder in ("images", "masks", "masks_merged"):
        (tmp_path / folder).mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "images" / "ct_00--a--x_0001.png")
    for name in ("masks/r.png", "masks_merged/m_merged.png", "masks/r2.png"):
        Image.new("L", (8, 8), 1).save(tmp_path / name)
    records = [
        {
            "id": 1,
            "image": "images/ct_00--a--x_0001.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in <region>masks/r.png</region>?"},
                {"from": "gpt", "value": "The liver."},
                {"from": "human", "value": "And <region>masks/r2.png</region>? Segment it."},
                {"from": "gpt", "value": "It is <SEG>.<mask>masks_merged/m_merged.png</mask>"},
            ],
        },
    ]
    (tmp_path / "MeCoVQA-Region.json").write_text(json.dumps(records))
    (r,) = read_mecovqa(tmp_path, "train")
    assert r.task == "region" and r.modality == "CT" and r.id == "mecovqa/region/1"
    assert r.question == "What is in <region></region>?" and r.answer == "The liver."
    assert r.turns[1].question == "And <region></region>? Segment it." and r.turns[1].answer == "It is <SEG>."
    assert r.region == str(tmp_path / "masks" / "r.png")
    assert r.extra["regions"] == [str(tmp_path / "masks" / "r.png"), str(tmp_path / "masks" / "r2.png")]
    assert r.mask_path == str(tmp_path / "masks_merged" / "m_merged.png")


def test_mecovqa_explicit_subset_must_exist(mecovqa_small, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MeCoVQA-Complex.json"):
        read_mecovqa(tmp_path, "train", subsets=["complex"])
    with pytest.raises(DataError, match="unknown MeCoVQA subset"):
        read_mecovqa(mecovqa_small[0], "train", subsets=["caption"])
