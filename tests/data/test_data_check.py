"""`medpipe data check`: the JSON shape, counts that match the writers, every problem, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main

SPLIT_KEYS = {"records", "closed", "open", "modalities", "tasks", "filtered"}
PROBLEM_KEYS = {"file", "record", "field", "reason"}


def check(capsys, *args: str) -> tuple[int, dict]:
    code = main(["data", "check", *args, "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out  # exactly one JSON object on one line
    return code, json.loads(out)


@pytest.mark.parametrize(
    "fixture, fmt, extra",
    [
        ("vqa_rad_original", "vqa_rad", []),
        ("vqa_rad_parquet", "vqa_rad", []),
        ("slake_small", "slake", ["--languages", "en,zh"]),
        ("pathvqa_parquet", "pathvqa", []),
        ("pathvqa_pickle", "pathvqa", ["--allow-pickle"]),
        ("conversation_small", "conversation", []),
        ("mecovqa_small", "mecovqa", []),
    ],
)
def test_clean_datasets(request, capsys, fixture: str, fmt: str, extra: list[str]) -> None:
    root, counts = request.getfixturevalue(fixture)
    code, report = check(capsys, "--format", fmt, str(root), *extra)
    assert code == 0 and report["problems"] == []
    assert set(report) == {"splits", "problems", "checks"}
    assert all(split["filtered"] == {} for split in report["splits"].values())
    assert {s: v["records"] for s, v in report["splits"].items()} == counts
    for split in report["splits"].values():
        assert set(split) == SPLIT_KEYS
        assert split["closed"] + split["open"] == split["records"]
        assert sum(split["modalities"].values()) == sum(split["tasks"].values()) == split["records"]


def test_mecovqa_counts_per_task_and_modality(capsys, mecovqa_small) -> None:
    from datamodules.readers.mecovqa import read_mecovqa

    root, _ = mecovqa_small
    _, report = check(capsys, "--format", "mecovqa", str(root))
    test = report["splits"]["test"]
    assert test["tasks"] == {"grounding": 3, "region": 3, "vqa": 3}
    records = read_mecovqa(root, "test")
    expected = {}
    for r in records:
        expected[r.modality] = expected.get(r.modality, 0) + 1
    assert test["modalities"] == expected
    assert test["closed"] == sum(r.answer_type == "closed" for r in records)


def test_problems_are_listed_and_exit_code_is_1(capsys, tmp_path: Path, slake_small) -> None:
    root = tmp_path / "slake"
    shutil.copytree(slake_small[0], root)
    items = json.loads((root / "test.json").read_text())
    en = [k for k, i in enumerate(items) if i["q_lang"] == "en"]
    items[en[0]]["answer_type"] = "SOMETIMES"
    items[en[1]]["answer"] = ""
    (root / "test.json").write_text(json.dumps(items, ensure_ascii=False))
    last = items[en[-1]]["img_name"]  # another image than the first records'
    assert last != items[en[0]]["img_name"]
    image = root / "imgs" / last
    image.write_bytes(image.read_bytes()[:50])  # truncated: found by decoding, not by indexing
    using_image = sum(1 for k in en if items[k]["img_name"] == last)
    (root / "train.json").write_text("[{]")
    code, report = check(capsys, "--format", "slake", str(root))
    assert code == 1
    assert "train" not in report["splits"] and report["splits"]["validate"]["records"] > 0
    assert all(set(p) == PROBLEM_KEYS for p in report["problems"])
    reasons = [p["reason"].split(":", 1)[0] for p in report["problems"]]
    expected_kinds = {"malformed_json": 1, "unknown_answer_type": 1, "empty_answer": 1, "corrupt_image": using_image}
    assert {k: reasons.count(k) for k in expected_kinds} == expected_kinds
    malformed = next(p for p in report["problems"] if p["reason"].startswith("malformed_json"))
    assert malformed["file"].endswith("train.json") and malformed["field"] == "<json>"


def test_text_output_and_missing_folder(capsys, tmp_path: Path) -> None:
    assert main(["data", "check", "--format", "vqa_rad", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and "dataset folder not found" in out
