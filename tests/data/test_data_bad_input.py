"""Every bad-input case under both policies: ``error`` names file, record and field; ``skip``
drops exactly the bad record and counts it under its reason."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.problems import DataError, ProblemLog
from datamodules.readers import read_split
from datamodules.specs import DatasetSpec
from datamodules.verify import verify_records


def read_and_verify(spec: DatasetSpec, split: str, problems: ProblemLog) -> list:
    """What a DataModule with verify_images (and `medpipe data check`) does with a split."""
    return verify_records(read_split(spec, spec.format, split, problems), problems)


# -- SLAKE record cases: each breaks record 1 of train.json ----------------------------------------


def _set(field: str, value: object) -> Callable:
    def mutate(item: dict, root: Path) -> None:
        item[field] = value

    return mutate


def _drop(field: str) -> Callable:
    def mutate(item: dict, root: Path) -> None:
        del item[field]

    return mutate


def _image(content: Callable[[bytes], bytes]) -> Callable:
    """Point the record at its own copy of its image, rewritten by ``content``."""

    def mutate(item: dict, root: Path) -> None:
        good = (root / "imgs" / item["img_name"]).read_bytes()
        (root / "imgs" / "bad").mkdir(exist_ok=True)
        (root / "imgs" / "bad" / "source.jpg").write_bytes(content(good))
        item["img_name"] = "bad/source.jpg"

    return mutate


SLAKE_CASES = {
    "missing_field": (_drop("answer"), "answer", "train.json"),
    "unknown_answer_type": (_set("answer_type", "MAYBE"), "answer_type", "train.json"),
    "empty_answer": (_set("answer", "  "), "answer", "train.json"),
    "path_escapes_root": (_set("img_name", "../../outside/source.jpg"), "img_name", "train.json"),
    "missing_image": (_set("img_name", "xmlab999/source.jpg"), "img_name", "train.json"),
    "corrupt_image": (_image(lambda good: bytes(range(256)) * 8), "image", "bad/source.jpg"),
    "truncated_image": (_image(lambda good: good[: len(good) // 2]), "image", "bad/source.jpg"),
}


@pytest.fixture
def slake_copy(tmp_path: Path) -> tuple[Path, list]:
    from datamodules.writers.slake import write_slake

    root = tmp_path / "slake"
    write_slake(root, n_train=2, n_val=0, n_test=0, seed=5, size=32, questions_per_image=3)
    return root, json.loads((root / "train.json").read_text())


@pytest.mark.parametrize("case", sorted(SLAKE_CASES))
def test_slake_bad_record_error_policy(slake_copy, case: str) -> None:
    root, items = slake_copy
    mutate, field, file = SLAKE_CASES[case]
    mutate(items[1], root)
    (root / "train.json").write_text(json.dumps(items))
    with pytest.raises(DataError) as info:
        read_and_verify(DatasetSpec(format="slake", path=str(root)), "train", ProblemLog("error"))
    message = str(info.value)
    assert file in message, message
    assert f"field '{field}'" in message, message
    qid = items[1]["qid"]
    assert ("record 1 (id" in message and str(qid) in message) or f"slake/{qid}" in message, message


@pytest.mark.parametrize("case", sorted(SLAKE_CASES))
def test_slake_bad_record_skip_policy(slake_copy, case: str) -> None:
    root, items = slake_copy
    mutate, field, _ = SLAKE_CASES[case]
    mutate(items[1], root)
    (root / "train.json").write_text(json.dumps(items))
    problems = ProblemLog("skip")
    records = read_and_verify(DatasetSpec(format="slake", path=str(root)), "train", problems)
    assert [r.id for r in records] == [f"slake/{i['qid']}" for k, i in enumerate(items) if k != 1]
    kind = "corrupt_image" if case == "truncated_image" else case
    assert problems.counts() == {kind: 1}
    assert problems.problems[0].field == field


def test_malformed_json_raises_under_both_policies(slake_copy) -> None:
    root, _ = slake_copy
    text = (root / "train.json").read_text()
    cut = text.index('"qid"', text.index("}") + 1)  # inside record 1
    (root / "train.json").write_text(text[:cut] + '"qid": }' + text[cut:])
    for policy in ("error", "skip"):  # a file that does not parse is never skipped silently
        with pytest.raises(DataError) as info:
            read_split(DatasetSpec(format="slake", path=str(root)), "slake", "train", ProblemLog(policy))
        message = str(info.value)
        assert "train.json" in message and "record 1" in message and "field '<json>'" in message
        assert "malformed JSON at line" in message
        assert info.value.problem.kind == "malformed_json"


# -- masks (MeCoVQA) ---------------------------------------------------------------------------------


@pytest.fixture
def mecovqa_copy(tmp_path: Path) -> tuple[Path, list]:
    from datamodules.writers.mecovqa import write_mecovqa

    root = tmp_path / "meco"
    write_mecovqa(root, n_train=3, n_test=0, seed=6, size=32)
    return root, json.loads((root / "MeCoVQA-Grounding.json").read_text())


def _mask_escapes(item: dict, root: Path) -> None:
    item["conversations"][1]["value"] = "It is <SEG>.<mask>../../secret.png</mask>"


def _mask_without_seg(item: dict, root: Path) -> None:
    item["conversations"][1]["value"] = item["conversations"][1]["value"].replace("<SEG>", "it")


def _mask_wrong_size(item: dict, root: Path) -> None:
    Image.fromarray(np.ones((16, 20), np.uint8)).save(root / "masks_merged" / "small.png")
    item["conversations"][1]["value"] = "Sure, it is <SEG>. <mask>masks_merged/small.png</mask>"


def _mask_missing(item: dict, root: Path) -> None:
    item["conversations"][1]["value"] = "Sure, it is <SEG>. <mask>masks_merged/none.png</mask>"


MASK_CASES = {
    "path_escapes_root": (_mask_escapes, "conversations[1].value", "MeCoVQA-Grounding.json"),
    "mask_without_seg": (_mask_without_seg, "conversations[1].value", "MeCoVQA-Grounding.json"),
    "mask_size_mismatch": (_mask_wrong_size, "mask_path", "small.png"),
    "missing_mask": (_mask_missing, "conversations[1].value", "MeCoVQA-Grounding.json"),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_mask_cases(mecovqa_copy, case: str, policy: str) -> None:
    root, items = mecovqa_copy
    mutate, field, file = MASK_CASES[case]
    mutate(items[1], root)
    (root / "MeCoVQA-Grounding.json").write_text(json.dumps(items))
    spec = DatasetSpec(format="mecovqa", path=str(root), subsets=["grounding"])
    problems = ProblemLog(policy)
    if policy == "error":
        with pytest.raises(DataError) as info:
            read_and_verify(spec, "train", problems)
        message = str(info.value)
        assert file in message and f"field '{field}'" in message and items[1]["id"] in message, message
        return
    records = read_and_verify(spec, "train", problems)
    assert [r.id for r in records] == [f"mecovqa/grounding/{i['id']}" for k, i in enumerate(items) if k != 1]
    assert problems.counts() == {case: 1}


def test_duplicate_ids_are_bad_records(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    (tmp_path / "train.json").write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": conv}] * 2))
    spec = DatasetSpec(format="conversation", path=str(tmp_path))
    with pytest.raises(DataError, match="duplicate record id 'conversation/x'"):
        read_split(spec, "conversation", "train", ProblemLog("error"))
    problems = ProblemLog("skip")
    assert len(read_split(spec, "conversation", "train", problems)) == 1 and problems.counts() == {"duplicate_id": 1}


# -- the DataModule: counts, the printed summary, and corrupt images met while loading --------------


def test_datamodule_skips_counts_and_prints(slake_copy, caplog) -> None:
    from datamodules.datamodule import VQADataModule

    root, items = slake_copy
    del items[0]["question"]
    _image(lambda good: good[:100])(items[2], root)
    (root / "train.json").write_text(json.dumps(items))
    dm = VQADataModule(
        datasets={"s": DatasetSpec(format="slake", path=str(root), val_split=None, test_split=None)},
        on_bad_record="skip",
        verify_images=True,
    )
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        records = dm.split_records("train")
    assert len(records) == len(items) - 2
    assert dm.problems.counts() == {"missing_field": 1, "corrupt_image": 1}
    assert "skipped 2 records (corrupt_image=1, missing_field=1)" in caplog.text


def test_corrupt_image_at_load_time_names_file_and_record(slake_copy, tokenizer, transform) -> None:
    from datamodules.dataset import VQADataset
    from datamodules.encoding import ConversationEncoder

    root, items = slake_copy
    _image(lambda good: good[: len(good) // 3])(items[1], root)
    (root / "train.json").write_text(json.dumps(items))
    records = read_split(DatasetSpec(format="slake", path=str(root)), "slake", "train", ProblemLog("skip"))
    assert len(records) == len(items)  # indexing does not decode images
    dataset = VQADataset(
        records, encoder=ConversationEncoder(tokenizer, num_image_tokens=4), transform=transform, with_answers=True
    )
    dataset[0]
    with pytest.raises(DataError) as info:
        dataset[1]
    message = str(info.value)
    assert "bad/source.jpg" in message and f"slake/{items[1]['qid']}" in message and "field 'image'" in message
    assert "medpipe data check" in message


@pytest.mark.slow  # importing MLflow takes most of its ~10 s
def test_skip_counts_are_logged_to_mlflow(slake_copy, tmp_path: Path, monkeypatch) -> None:
    """The runner logs the params ``data.skipped`` and ``data.skipped_<kind>`` on each stage's MLflow run."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: no sqlite schema migration
    from mlflow.tracking import MlflowClient

    from datamodules.datamodule import VQADataModule
    from pipeline.callbacks import LossHistory
    from pipeline.runner import log_stage_records
    from pipeline.tracking import Tracker

    root, items = slake_copy
    del items[0]["question"]
    items[1]["answer"] = ""
    items[2]["answer"] = " "
    (root / "train.json").write_text(json.dumps(items))
    dm = VQADataModule(
        datasets={"s": DatasetSpec(format="slake", path=str(root), val_split=None, test_split=None)},
        on_bad_record="skip",
    )
    assert len(dm.split_records("train")) == len(items) - 3
    uri = (tmp_path / "mlruns").as_uri()
    tracker = Tracker(tracking_uri=uri, experiment_name="skips")
    run_id = tracker.start_child(run_name="stage")
    log_stage_records(tracker, run_id, dm, LossHistory(), "stage")
    params = MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert {k: v for k, v in params.items() if k.startswith("data.skipped")} == {
        "data.skipped": "3",
        "data.skipped_missing_field": "1",
        "data.skipped_empty_answer": "2",
    }
