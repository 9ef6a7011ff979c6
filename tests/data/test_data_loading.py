"""Dataset items and batches: masks at the original resolution, the mixture DataModule end to end,
and the JSON list loader's errors against ``json``'s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.datamodule import VQADataModule
from datamodules.images import load_mask
from datamodules.problems import DataError
from datamodules.readers.common import load_json_list
from datamodules.specs import DatasetSpec

# -- masks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda a: Image.fromarray(a.astype(np.uint8)),  # 0/1
        lambda a: Image.fromarray(a.astype(np.uint8) * 255),  # 0/255
        lambda a: Image.fromarray(a.astype(np.uint16) * 1000),  # 16 bit
        lambda a: Image.fromarray(np.stack([np.zeros_like(a), a * 7, np.zeros_like(a)], -1).astype(np.uint8)),  # RGB
        lambda a: Image.fromarray(a.astype(np.uint8)).convert("P"),  # palette index
        lambda a: Image.fromarray(np.stack([a * 3, np.full_like(a, 255)], -1).astype(np.uint8), "LA"),  # + alpha
    ],
)
def test_load_mask_foreground_is_pixel_at_least_one(tmp_path: Path, make) -> None:
    truth = np.zeros((5, 7), bool)
    truth[1:3, 2:6] = True
    path = tmp_path / "m.png"
    make(truth).save(path)
    mask = load_mask(path)
    assert mask.dtype == bool and mask.shape == (5, 7)
    assert np.array_equal(mask, truth)


def test_load_mask_errors_name_file_and_record(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.png: record r1: field 'region': file not found"):
        load_mask(tmp_path / "nope.png", record="r1", field_name="region")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="corrupt or truncated mask"):
        load_mask(tmp_path / "bad.png", record="r2")


def test_items_carry_original_resolution_masks(mecovqa_small, tokenizer, transform) -> None:
    from datamodules.dataset import Collator, VQADataset
    from datamodules.encoding import ConversationEncoder
    from datamodules.readers.mecovqa import read_mecovqa

    root, _ = mecovqa_small
    records = read_mecovqa(root, "test")
    dataset = VQADataset(
        records, encoder=ConversationEncoder(tokenizer, num_image_tokens=4), transform=transform, with_answers=True
    )
    by_task = {r.task: i for i, r in enumerate(records)}
    grounding, region, vqa = (dataset[by_task[t]] for t in ("grounding", "region", "vqa"))
    assert grounding["pixel_values"].shape == (3, 64, 64)  # the vision transform's size
    assert grounding["image_size"] == (32, 32) and grounding["mask"].shape == (32, 32)  # the original's
    expected = np.asarray(Image.open(records[by_task["grounding"]].mask_path)) >= 1
    assert grounding["mask"].dtype == torch.bool and np.array_equal(grounding["mask"].numpy(), expected)
    assert "mask" not in region and region["region_mask"].shape == (32, 32) and region["region_mask"].any()
    assert "image_size" not in vqa and "mask" not in vqa
    batch = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="right")([vqa, grounding, region])
    assert batch["masks"][0] is None and batch["masks"][1] is grounding["mask"] and batch["masks"][2] is None
    assert batch["region_masks"][2] is region["region_mask"] and batch["image_sizes"] == [None, (32, 32), (32, 32)]
    assert "masks" not in Collator(pad_token_id=0, padding_side="right")([vqa])


def test_mask_size_mismatch_at_load_time(tmp_path: Path, tokenizer, transform) -> None:
    from datamodules.dataset import VQADataset
    from datamodules.encoding import ConversationEncoder
    from datamodules.records import Record

    Image.new("L", (10, 10)).save(tmp_path / "img.png")
    Image.new("L", (12, 10), 1).save(tmp_path / "mask.png")
    record = Record(
        id="g1",
        dataset="d",
        split="train",
        question="Segment it",
        answer="<SEG>",
        answer_type="open",
        image_path=str(tmp_path / "img.png"),
        mask_path=str(tmp_path / "mask.png"),
    )
    dataset = VQADataset(
        [record], encoder=ConversationEncoder(tokenizer, num_image_tokens=4), transform=transform, with_answers=True
    )
    expected = r"mask.png: record g1: field 'mask_path': mask is 12x10 but its image is 10x10"
    with pytest.raises(DataError, match=expected):
        dataset[0]


# -- the mixture DataModule ---------------------------------------------------------------------------


def datamodule(slake_small, mecovqa_small, **options) -> VQADataModule:
    specs = {
        "slake": DatasetSpec(format="slake", path=str(slake_small[0]), val_split=None, weight=1.0),
        "meco": DatasetSpec(format="mecovqa", path=str(mecovqa_small[0]), val_split=None, weight=1.0),
    }
    return VQADataModule(datasets=specs, batch_size=4, **options)


def test_datamodule_one_task_per_batch(slake_small, mecovqa_small, tokenizer, transform) -> None:
    dm = datamodule(slake_small, mecovqa_small, one_task_per_batch=True, samples_per_epoch=64, seed=3)
    dm.connect(tokenizer, transform, num_image_tokens=4, task_ids={"vqa": 0, "region": 1, "grounding": 2})
    batches = list(dm.train_dataloader())
    assert len(batches) == 16 and all(len(b["records"]) == 4 for b in batches)
    for b in batches:
        assert len({(r.dataset, r.task) for r in b["records"]}) == 1
        assert len(set(b["task_ids"].tolist())) == 1
    datasets = [b["records"][0].dataset for b in batches]
    assert datasets.count("slake") == 8 and datasets.count("meco") == 8  # equal weights
    # same seed, same batches
    again = datamodule(slake_small, mecovqa_small, one_task_per_batch=True, samples_per_epoch=64, seed=3)
    again.connect(tokenizer, transform, num_image_tokens=4)
    assert [[r.id for r in b["records"]] for b in again.train_dataloader()] == [
        [r.id for r in b["records"]] for b in batches
    ]
    assert dm.val_dataloader() == []  # neither dataset has a validation split


def test_datamodule_shards_by_explicit_rank(slake_small, mecovqa_small) -> None:
    dm = datamodule(slake_small, mecovqa_small)
    records = dm.split_records("train")
    for name, spec in dm.datasets.items():  # weights proportional to sizes: plain concatenation
        spec.weight = float(sum(r.dataset == name for r in records))
    assert len(records) % 2 == 0
    shards = [list(dm.train_sampler(world_size=2, rank=r)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(records) // 2
    assert sorted(shards[0] + shards[1]) == list(range(len(records)))  # each record once, on one rank


# -- JSON lists -----------------------------------------------------------------------------------------


def test_load_json_list_matches_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = [
        {"id": i, "q": "x" * int(rng.integers(0, 40)), "n": [1, 2.5, -3e5, None, True], "zh": "是"} for i in range(40)
    ] + [12345, -0.25, "s", None, [], {}]
    path = tmp_path / "a.json"
    for indent in (None, 2):
        path.write_text(json.dumps(data, indent=indent, ensure_ascii=False))
        assert load_json_list(path) == data


@pytest.mark.parametrize(
    "text, record",
    [("[1,]", "1"), ("[1 2]", "0"), ('[{"a": 1},\n {"a": }]', "1"), ("[1] x", "-"), ('[\n{"a":1},\n{"a":2,}\n]', "1")],
)
def test_load_json_list_errors_match_json_positions(tmp_path: Path, text: str, record: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    with pytest.raises(DataError) as info:
        load_json_list(path)
    assert f"line {reference.value.lineno} column {reference.value.colno}" in str(info.value)
    assert info.value.problem.record == record  # the list element being read ("-": after the list)


def test_load_json_list_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"q": "是"}, 2], ensure_ascii=False).encode())
    assert load_json_list(path) == [{"q": "是"}, 2]


def test_load_json_list_top_level_must_be_a_list(tmp_path: Path) -> None:
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list of records, got object"):
        load_json_list(path)
    path.write_text("  ")
    with pytest.raises(DataError, match="expected a JSON list of records, got an empty file"):
        load_json_list(path)


def test_load_json_list_size_cap_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join(["1"] * 1000) + "]")
    with pytest.raises(DataError, match=r"big.json: record -: field '<json>': 0 MiB is more than .* limit of 0 MiB"):
        load_json_list(path, max_bytes=1000)
    assert len(load_json_list(path, max_bytes=1 << 20)) == 1000


def test_one_dataset_datamodules(vqa_rad_original, pathvqa_pickle, mecovqa_small, slake_small) -> None:
    """The mixture DataModule over a single release, with that release's split names."""

    def one(spec: DatasetSpec, **options) -> VQADataModule:
        return VQADataModule(datasets={spec.format: spec}, **options)

    rad = one(DatasetSpec(format="vqa_rad", path=str(vqa_rad_original[0]), val_split=None), batch_size=2)
    assert len(rad.split_records("train")) == vqa_rad_original[1]["train"] and rad.val_dataloader() == []
    pathvqa = DatasetSpec(format="pathvqa", path=str(pathvqa_pickle[0]), val_split="validation")
    with pytest.raises(DataError, match="executes code"):
        one(pathvqa).split_records("val")
    pvqa = one(DatasetSpec(format="pathvqa", path=str(pathvqa_pickle[0]), val_split="validation", allow_pickle=True))
    assert len(pvqa.split_records("val")) == pathvqa_pickle[1]["val"]
    meco = one(DatasetSpec(format="mecovqa", path=str(mecovqa_small[0]), val_split=None, subsets=["region"]))
    assert {r.task for r in meco.split_records("test")} == {"region"} and len(meco.split_records("test")) == 3
    refer = one(DatasetSpec(format="slake", path=str(slake_small[0]), task="refer")).split_records("val")
    assert refer and {r.task for r in refer} == {"refer"}


@pytest.mark.slow  # importing monai.transforms costs ~9 s of CPU, which is why the loader does not use it
def test_16_bit_scaling_and_mask_binarisation_match_monai(tmp_path: Path) -> None:
    """MONAI as the reference: ScaleIntensity(0, 255) for 16-bit images, AsDiscrete(threshold=1) for masks."""
    from monai.transforms import AsDiscrete, ScaleIntensity

    from datamodules.images import load_image

    rng = np.random.default_rng(4)
    raw = rng.integers(200, 4000, (9, 11)).astype(np.uint16)  # a CT-like 16-bit slice
    Image.fromarray(raw).save(tmp_path / "ct16.png")
    ours = np.asarray(load_image(tmp_path / "ct16.png"))  # (H, W, 3) uint8
    scaled = ScaleIntensity(minv=0.0, maxv=255.0, dtype=np.float64)(raw[None].astype(np.float64))  # (1, H, W)
    reference = np.round(np.asarray(scaled)[0]).astype(np.uint8)
    assert np.array_equal(ours[..., 0], reference) and np.array_equal(ours[..., 2], reference)
    labels = rng.integers(0, 4, (9, 11)).astype(np.uint8)  # 0 background, 1..3 organ labels
    Image.fromarray(labels).save(tmp_path / "labels.png")
    binary = np.asarray(AsDiscrete(threshold=1.0)(labels[None].astype(np.float32)))[0].astype(bool)  # (H, W)
    assert np.array_equal(load_mask(tmp_path / "labels.png"), binary)
