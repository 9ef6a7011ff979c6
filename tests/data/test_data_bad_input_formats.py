"""The bad-input cases in every reader's own code path (test_data_bad_input.py covers them on SLAKE
and the MeCoVQA masks): VQA-RAD original, the hub parquet export, the PathVQA pickles and LLaVA
conversation JSON. Each case breaks record 1 of the train split; ``error`` must name the file,
the record (index and id) and the field, ``skip`` must drop exactly that record and count it."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.problems import DataError, ProblemLog
from datamodules.readers import read_split
from datamodules.specs import DatasetSpec
from datamodules.verify import verify_records

SIZE = 16


def read_and_verify(spec: DatasetSpec, problems: ProblemLog) -> list:
    return verify_records(read_split(spec, spec.format, "train", problems), problems)


# -- per format: write a small dataset, load / store its train annotations, the record's id -----------


def _vqa_rad(root: Path) -> None:
    from datamodules.writers.vqa_rad import write_vqa_rad

    write_vqa_rad(root, n_train=2, n_test=1, seed=7, size=SIZE, questions_per_image=3, para_fraction=0.0)


def _conversation(root: Path) -> None:
    from datamodules.writers.conversation import write_conversation

    write_conversation(root, kind="vqa", n_train=2, n_val=0, n_test=0, seed=7, size=SIZE, questions_per_image=3)


def _pathvqa(root: Path) -> None:
    from datamodules.writers.pathvqa import write_pathvqa

    write_pathvqa(root, layout="pickle", n_train=2, n_val=0, n_test=0, seed=7, size=SIZE, questions_per_image=3)


def _json_io(name: str):
    return (
        lambda root: json.loads((root / name).read_text()),
        lambda root, items: (root / name).write_text(json.dumps(items)),
    )


def _pickle_io(name: str):
    def load(root: Path):
        with open(root / name, "rb") as f:
            return pickle.load(f)  # the test's own file

    def store(root: Path, items) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(items, f)

    return load, store


FORMATS = {
    # format: (writer, annotation file, (load, store), id field, spec options, expected id of an item)
    "vqa_rad": (
        _vqa_rad,
        "VQA_RAD Dataset Public.json",
        _json_io("VQA_RAD Dataset Public.json"),
        "qid",
        {},
        lambda i: f"vqa_rad/{i['qid']}",
    ),
    "conversation": (
        _conversation,
        "train.json",
        _json_io("train.json"),
        "id",
        {},
        lambda i: f"conversation/{i['id']}",
    ),
    "pathvqa": (
        _pathvqa,
        "train_vqa.pkl",
        _pickle_io("qas/train_vqa.pkl"),
        "question_id",
        {"allow_pickle": True},
        lambda i: f"pathvqa/{i['question_id']}",
    ),
}


def _set(key: str, value: object) -> Callable:
    def mutate(item: dict) -> None:
        item[key] = value

    return mutate


def _drop(key: str) -> Callable:
    def mutate(item: dict) -> None:
        del item[key]

    return mutate


def _answer(value: str) -> Callable:
    def mutate(item: dict) -> None:
        item["conversations"][1]["value"] = value

    return mutate


# (format, case) -> (mutation of record 1, field named in the error)
CASES = {
    ("vqa_rad", "missing_field"): (_drop("question"), "question"),
    ("vqa_rad", "unknown_answer_type"): (_set("answer_type", "YES/NO?"), "answer_type"),
    ("vqa_rad", "empty_answer"): (_set("answer", " "), "answer"),
    ("vqa_rad", "path_escapes_root"): (_set("image_name", "../../etc/passwd"), "image_name"),
    ("vqa_rad", "missing_image"): (_set("image_name", "synpic1.jpg"), "image_name"),
    ("conversation", "missing_field"): (_drop("conversations"), "conversations"),
    ("conversation", "unknown_answer_type"): (_set("answer_type", "sometimes"), "answer_type"),
    ("conversation", "empty_answer"): (_answer(""), "conversations[1].value"),
    ("conversation", "path_escapes_root"): (_set("image", "../outside.jpg"), "image"),
    ("conversation", "missing_image"): (_set("image", "images/none.jpg"), "image"),
    ("pathvqa", "missing_field"): (_drop("sent"), "sent"),
    ("pathvqa", "empty_answer"): (_set("label", {}), "label"),
    ("pathvqa", "path_escapes_root"): (_set("img_id", "../../../outside"), "img_id"),
    ("pathvqa", "missing_image"): (_set("img_id", "train_9999"), "img_id"),
}


def _broken(tmp_path: Path, fmt: str, case: str) -> tuple[DatasetSpec, list, str, str]:
    write, file, (load, store), id_key, options, expected_id = FORMATS[fmt]
    root = tmp_path / fmt
    write(root)
    items = load(root)
    mutate, field = CASES[(fmt, case)]
    mutate(items[1])
    store(root, items)
    return DatasetSpec(format=fmt, path=str(root), **options), items, field, file


@pytest.mark.parametrize("fmt, case", sorted(CASES))
def test_bad_record_error_names_file_record_field(tmp_path: Path, fmt: str, case: str) -> None:
    spec, items, field, file = _broken(tmp_path, fmt, case)
    with pytest.raises(DataError) as info:
        read_and_verify(spec, ProblemLog("error"))
    message = str(info.value)
    rid = items[1][FORMATS[fmt][3]]
    assert file in message and f"record 1 (id {rid})" in message and f"field '{field}'" in message, message
    assert info.value.problem.kind == case and "on_bad_record=skip" in message


@pytest.mark.parametrize("fmt, case", sorted(CASES))
def test_bad_record_skip_drops_and_counts(tmp_path: Path, fmt: str, case: str) -> None:
    spec, items, field, _ = _broken(tmp_path, fmt, case)
    problems = ProblemLog("skip")
    records = read_and_verify(spec, problems)
    expected_id = FORMATS[fmt][5]
    train = [i for i in items if fmt != "vqa_rad" or not i["phrase_type"].startswith("test")]
    assert [r.id for r in records] == [expected_id(i) for k, i in enumerate(train) if k != 1]
    assert problems.counts() == {case: 1} and problems.problems[0].field == field
    assert problems.summary() == f"skipped 1 records ({case}=1)"


def test_malformed_pickle_is_a_file_error(tmp_path: Path) -> None:
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps([{"a": 1}])[:-3])  # truncated
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=r"train_vqa.pkl: record -: field '<pickle>': unreadable pickle"):
            read_split(
                DatasetSpec(format="pathvqa", path=str(tmp_path), allow_pickle=True), "p", "train", ProblemLog(policy)
            )


# -- the hub parquet export (VQA-RAD and PathVQA share the reader) -------------------------------------


def _jpeg(shade: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (shade, shade, shade)).save(buf, format="JPEG")
    return buf.getvalue()


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_rows(root: Path, rows: list[dict], *, split: str = "train", answer_type: bool = False) -> Path:
    fields = [("image", IMAGE), ("question", pa.string()), ("answer", pa.string())]
    if answer_type:
        fields.append(("answer_type", pa.string()))
    path = root / "data" / f"{split}-00000-of-00001-abc123.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
    return path


def good_row(k: int, answer: str = "yes", **extra) -> dict:
    return {
        "image": {"bytes": _jpeg(10 * k), "path": f"synpic{k}.jpg"},
        "question": f"q{k}?",
        "answer": answer,
        **extra,
    }


PARQUET_CASES = {
    # case: (row 1 as written, field, needs an answer_type column)
    "missing_field": (
        {"image": {"bytes": _jpeg(), "path": "a.jpg"}, "question": None, "answer": "yes"},
        "question",
        False,
    ),
    "empty_answer": (good_row(1, answer="  "), "answer", False),
    "unknown_answer_type": (good_row(1, answer_type="MAYBE"), "answer_type", True),
    "missing_image": ({"image": None, "question": "q?", "answer": "no"}, "image", False),
    "path_escapes_root": (
        {"image": {"bytes": None, "path": "../../x.jpg"}, "question": "q?", "answer": "no"},
        "image.path",
        False,
    ),
    "corrupt_image": (
        {"image": {"bytes": b"\xff\xd8 not a jpeg" * 20, "path": "c.jpg"}, "question": "q?", "answer": "no"},
        "image",
        False,
    ),
    "truncated_image": (
        {"image": {"bytes": _jpeg(3)[:200], "path": "t.jpg"}, "question": "q?", "answer": "no"},
        "image",
        False,
    ),
}


@pytest.mark.parametrize("fmt", ["vqa_rad", "pathvqa"])
@pytest.mark.parametrize("case", sorted(PARQUET_CASES))
def test_hub_parquet_bad_rows(tmp_path: Path, fmt: str, case: str) -> None:
    bad, field, with_type = PARQUET_CASES[case]
    rows = [
        good_row(0, **({"answer_type": "CLOSED"} if with_type else {})),
        {**bad, **({"answer_type": bad.get("answer_type", "OPEN")} if with_type else {})},
        good_row(2, answer="left", **({"answer_type": "OPEN"} if with_type else {})),
    ]
    file = write_rows(tmp_path, rows, answer_type=with_type)
    spec = DatasetSpec(format=fmt, path=str(tmp_path))
    with pytest.raises(DataError) as info:
        read_and_verify(spec, ProblemLog("error"))
    message = str(info.value)
    assert file.name in message and f"{fmt}/train/1" in message and f"field '{field}'" in message, message
    problems = ProblemLog("skip")
    records = read_and_verify(spec, problems)
    assert [r.id for r in records] == [f"{fmt}/train/0", f"{fmt}/train/2"]
    kind = "corrupt_image" if case == "truncated_image" else case
    assert problems.counts() == {kind: 1} and problems.problems[0].field == field


def test_hub_parquet_answer_type_column_and_plain_image_column(tmp_path: Path) -> None:
    rows = [
        good_row(0, answer="Yes.", answer_type="other"),  # the answer says closed
        good_row(1, answer="maybe", answer_type="yes/no"),  # the column says closed
        good_row(2, answer="left lung", answer_type="other"),
        good_row(3, answer="no"),
    ]  # no answer_type (null): from the answer
    rows[3]["answer_type"] = None
    write_rows(tmp_path, rows, answer_type=True)
    records = read_split(DatasetSpec(format="pathvqa", path=str(tmp_path)), "pathvqa", "train", ProblemLog())
    assert [r.answer_type for r in records] == ["closed", "closed", "open", "closed"]
    # an export with a plain binary image column
    plain = tmp_path / "plain"
    table = pa.table({"image": [_jpeg(1), _jpeg(2)], "question": ["a?", "b?"], "answer": ["no", "2"]})
    (plain / "data").mkdir(parents=True)
    pq.write_table(table, plain / "data" / "test-00000-of-00001.parquet")
    records = read_split(DatasetSpec(format="vqa_rad", path=str(plain)), "vqa_rad", "test", ProblemLog())
    assert [(r.answer, r.answer_type) for r in records] == [("no", "closed"), ("2", "open")]
    assert all(r.image_bytes and r.image_path is None for r in records)


def test_hub_parquet_file_level_errors(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "data" / "train-0.parquet")
    with pytest.raises(DataError, match=r"train-0.parquet: record -: field 'image': missing column"):
        read_split(DatasetSpec(format="vqa_rad", path=str(tmp_path)), "r", "train", ProblemLog("skip"))
    (tmp_path / "data" / "train-0.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(DataError, match=r"train-0.parquet: record -: field '<parquet>': unreadable parquet file"):
        read_split(DatasetSpec(format="vqa_rad", path=str(tmp_path)), "r", "train", ProblemLog("skip"))
    with pytest.raises(DataError, match=r"no parquet file for split 'test'"):
        read_split(DatasetSpec(format="vqa_rad", path=str(tmp_path)), "r", "test", ProblemLog())
