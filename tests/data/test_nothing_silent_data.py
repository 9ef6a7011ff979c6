"""Issue 16, "nothing silent", where data enters: every bad value is a problem naming file, record and field
(``error`` raises it in one line, ``skip`` drops and counts the record, and ``medpipe data check`` lists it),
parametrised over every release layout a class applies to. Classes: 1 field types, 2 silent filters and
leakage between splits, 5 decompression bombs, 6 prompts longer than ``max_length``.

Each case breaks record 1 of a small synthetic dataset written in the release's own layout.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import resource
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datamodules.datamodule import VQADataModule
from datamodules.problems import DataError, ProblemLog
from datamodules.readers import read_split
from datamodules.specs import DEFAULT_MAX_IMAGE_PIXELS, DatasetSpec
from datamodules.verify import verify_records
from pipeline.cli import main
from pipeline.data_check import check_dataset

SIZE = 16
REPO = Path(__file__).resolve().parents[2]
CLI_LOGGERS = ("medpipe", "pipeline", "datamodules", "lightningmodules")


@pytest.fixture(autouse=True)
def fresh_cli_logging():
    """`main` binds its log handler to the sys.stderr of the moment (a capsys stream that a later test closes):
    each test starts without one, and the state before it comes back after it."""
    loggers = [logging.getLogger(name) for name in CLI_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    for lg in loggers:
        lg.handlers[:], lg.propagate, lg.level = [], True, logging.NOTSET
    yield
    for lg, (handlers, propagate, level) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.propagate, lg.level = handlers, propagate, level


# -- the release layouts: write, load / store the file holding train record 1, where each field lives ---------


def _json_io(name: str):
    return (
        lambda root: json.loads((root / name).read_text()),
        lambda root, items: (root / name).write_text(json.dumps(items)),  # NaN is written as NaN, as Python's json
    )


def _pickle_io(name: str):
    def load(root: Path) -> list:
        with open(root / name, "rb") as f:
            return pickle.load(f)  # the test's own file

    def store(root: Path, items: list) -> None:
        with open(root / name, "wb") as f:
            pickle.dump(items, f)

    return load, store


def _parquet_io(name: str):
    def store(root: Path, rows: list) -> None:
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(root / name)), root / name)

    return lambda root: pq.read_table(root / name).to_pylist(), store


def _conversation_value(k: int) -> Callable[[dict, Any], None]:
    def put(item: dict, value: Any) -> None:
        item["conversations"][k]["value"] = value

    return put


def _key(name: str) -> Callable[[dict, Any], None]:
    def put(item: dict, value: Any) -> None:
        item[name] = value

    return put


@dataclass
class Layout:
    fmt: str
    write: Callable[[Path], None]
    file: str  # the file holding train record 1, relative to the dataset folder
    io: tuple  # (load(root) -> items, store(root, items))
    fields: dict[str, tuple[str, Callable[[dict, Any], None]]]  # logical field -> (name in messages, setter)
    image_file: str | None  # where a replacement image of record 1 goes (None: embedded bytes)
    options: dict = field(default_factory=dict)  # DatasetSpec options
    cli: list[str] = field(default_factory=list)  # data check options

    def spec(self, root: Path, **options) -> DatasetSpec:
        return DatasetSpec(
            format=self.fmt, path=str(root), val_split=None, test_split=None, **{**self.options, **options}
        )

    def broken(self, root: Path, mutate: Callable[[dict, Path], None]) -> dict:
        """Write the dataset and break its train record 1; returns that record as stored."""
        self.write(root)
        load, store = self.io
        items = load(root)
        mutate(items[1], root)
        store(root, items)
        return items[1]

    def set(self, item: dict, logical: str, value: Any) -> None:
        self.fields[logical][1](item, value)

    def point_image(self, item: dict, root: Path, data: bytes) -> None:
        """Make record 1 use an image with the bytes ``data``."""
        if self.image_file is None:
            item["image"] = {"bytes": data, "path": "bomb.png"}
            return
        (root / self.image_file).parent.mkdir(parents=True, exist_ok=True)
        (root / self.image_file).write_bytes(data)
        self.set(item, "image", IMAGE_NAMES[self.fmt])


IMAGE_NAMES = {  # what record 1's image field says for Layout.image_file
    "vqa_rad": "bomb.png",
    "slake": "bomb/source.png",
    "pathvqa": "bomb",
    "conversation": "bomb.png",
    "mecovqa": "images/ct_bomb.png",
}


def _writer(fn: Callable, **kwargs) -> Callable[[Path], None]:
    return lambda root: fn(root, seed=7, size=SIZE, **kwargs)


def _vqa_rad(root: Path, **kw) -> None:
    from datamodules.writers.vqa_rad import write_vqa_rad

    write_vqa_rad(root, n_train=2, n_test=1, questions_per_image=3, para_fraction=0.0, **kw)


def _slake(root: Path, **kw) -> None:
    from datamodules.writers.slake import write_slake

    write_slake(root, n_train=2, n_val=0, n_test=1, questions_per_image=3, **kw)


def _pathvqa(root: Path, **kw) -> None:
    from datamodules.writers.pathvqa import write_pathvqa

    write_pathvqa(root, n_train=2, n_val=0, n_test=1, questions_per_image=3, **kw)


def _conversation(root: Path, **kw) -> None:
    from datamodules.writers.conversation import write_conversation

    write_conversation(root, kind="vqa", n_train=2, n_val=0, n_test=1, questions_per_image=3, **kw)


def _mecovqa(root: Path, **kw) -> None:
    from datamodules.writers.mecovqa import write_mecovqa

    write_mecovqa(root, n_train=2, n_test=1, **kw)


PARQUET_FIELDS = {
    "question": ("question", _key("question")),
    "answer": ("answer", _key("answer")),
    "image": ("image", lambda item, value: item.update(image={"bytes": None, "path": value})),
}
CONVERSATION_FIELDS = {
    "question": ("conversations[0].value", _conversation_value(0)),
    "answer": ("conversations[1].value", _conversation_value(1)),
    "image": ("image", _key("image")),
}
LAYOUTS = {
    "vqa_rad": Layout(
        "vqa_rad",
        _writer(_vqa_rad),
        "VQA_RAD Dataset Public.json",
        _json_io("VQA_RAD Dataset Public.json"),
        {
            "question": ("question", _key("question")),
            "answer": ("answer", _key("answer")),
            "image": ("image_name", _key("image_name")),
            "id": ("qid", _key("qid")),
        },
        "VQA_RAD Image Folder/bomb.png",
    ),
    "vqa_rad_parquet": Layout(
        "vqa_rad",
        _writer(_vqa_rad, layout="parquet"),
        "data/train-00000-of-00001.parquet",
        _parquet_io("data/train-00000-of-00001.parquet"),
        PARQUET_FIELDS,
        None,
    ),
    "slake": Layout(
        "slake",
        _writer(_slake),
        "train.json",
        _json_io("train.json"),
        {
            "question": ("question", _key("question")),
            "answer": ("answer", _key("answer")),
            "image": ("img_name", _key("img_name")),
            "id": ("qid", _key("qid")),
        },
        "imgs/bomb/source.png",
    ),
    "pathvqa_pickle": Layout(
        "pathvqa",
        _writer(_pathvqa, layout="pickle"),
        "qas/train_vqa.pkl",
        _pickle_io("qas/train_vqa.pkl"),
        {
            "question": ("sent", _key("sent")),
            "answer": ("label", _key("label")),
            "image": ("img_id", _key("img_id")),
            "id": ("question_id", _key("question_id")),
        },
        "images/train/bomb.jpg",
        options={"allow_pickle": True},
        cli=["--allow-pickle"],
    ),
    "pathvqa_parquet": Layout(
        "pathvqa",
        _writer(_pathvqa),
        "data/train-00000-of-00001.parquet",
        _parquet_io("data/train-00000-of-00001.parquet"),
        PARQUET_FIELDS,
        None,
    ),
    "conversation": Layout(
        "conversation",
        _writer(_conversation),
        "train.json",
        _json_io("train.json"),
        {**CONVERSATION_FIELDS, "id": ("id", _key("id"))},
        "bomb.png",
    ),
    "mecovqa": Layout(
        "mecovqa",
        _writer(_mecovqa),
        "MeCoVQA-Complex.json",
        _json_io("MeCoVQA-Complex.json"),
        {**CONVERSATION_FIELDS, "id": ("id", _key("id"))},
        "images/ct_bomb.png",
    ),
}


# -- what every bad record must do under both policies and in data check -------------------------------------


def read_and_verify(spec: DatasetSpec, problems: ProblemLog) -> list:
    """What a DataModule with verify_images (and `medpipe data check`) does with the train split."""
    return verify_records(read_split(spec, spec.format, "train", problems), problems)


def data_check(capsys, layout: Layout, root: Path, *extra: str) -> tuple[int, dict]:
    code = main(["data", "check", "--format", layout.fmt, str(root), "--json", *layout.cli, *extra])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, json.loads(captured.out)


def assert_bad_record(
    capsys, tmp_path: Path, layout: Layout, mutate: Callable[[dict, Path], None], field_name: str, kind: str
) -> None:
    """``error``: one line naming file, record 1 and the field; ``skip``: the record dropped and counted in the
    DataModule's ProblemLog (what the runner logs as data/skipped_<kind>); data check: listed, exit code 1."""
    root = tmp_path / "data"
    layout.broken(root, mutate)
    with pytest.raises(DataError) as info:
        read_and_verify(layout.spec(root), ProblemLog("error"))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert info.value.problem.kind == kind, message
    assert f"field '{field_name}'" in message, message
    named = info.value.problem.file
    assert (
        named.endswith(Path(layout.file).name)
        or named.endswith(f"{Path(layout.file).name} (embedded image)")
        or (layout.image_file is not None and named.endswith(Path(layout.image_file).name))
    ), message
    record = info.value.problem.record
    assert record.startswith("1 (id ") or record.endswith(("/1", "-1")), message

    clean = tmp_path / "clean"
    layout.write(clean)
    expected = len(read_split(layout.spec(clean), layout.fmt, "train", ProblemLog()))
    dm = VQADataModule(datasets={"d": layout.spec(root)}, on_bad_record="skip", verify_images=True)
    assert len(dm.split_records("train")) == expected - 1
    assert dm.problems.counts() == {kind: 1} and f"({kind}=1)" in dm.problems.summary()
    assert [p.kind for p in dm.split_problems["train"]] == [kind]

    code, report = data_check(capsys, layout, root)
    assert code == 1
    listed = [p for p in report["problems"] if p["reason"].startswith(f"{kind}:")]
    assert len(listed) == 1 and listed[0]["field"] == field_name, report["problems"]


# -- class 1: a field has one type ---------------------------------------------------------------------------

NAN = float("nan")
ANSWERS = {  # value of the answer -> kind
    "list": (["yes", "no"], "wrong_type"),
    "dict": ({"text": "yes"}, "wrong_type"),
    "bool": (True, "wrong_type"),
    "nan": (NAN, "wrong_type"),
    "null": (None, "missing_field"),
    "blank": ("  ", "empty_answer"),
}
QUESTIONS = {"list": (["Is it?", "Is it not?"], "wrong_type"), "empty": ("", "empty_question"), "null": (None, None)}
PARQUET = ("vqa_rad_parquet", "pathvqa_parquet")  # typed columns: only null and empty values are possible per row


def _type_cases() -> list[tuple[str, str, Any, str]]:
    """(layout, logical field, value, kind) for every layout."""
    cases = []
    for name in LAYOUTS:
        for case, (value, kind) in ANSWERS.items():
            if name in PARQUET and case not in ("null", "blank"):
                continue
            if name == "pathvqa_pickle":  # the answer is the best key of label: {answer: score}
                value, kind = {
                    "list": (["yes"], "wrong_type"),
                    "dict": ({"yes": "high"}, "wrong_type"),  # a score that is not a number
                    "bool": (True, "wrong_type"),
                    "nan": ({"yes": NAN}, "wrong_type"),
                    "null": (None, "missing_field"),
                    "blank": ({" ": 1}, "empty_answer"),
                }[case]
            cases.append((name, "answer", value, kind))
        for case, (value, kind) in QUESTIONS.items():
            if name in PARQUET and case == "list":
                continue
            cases.append((name, "question", value, kind or "missing_field"))
        image_kind = "missing_image" if name in PARQUET else "empty_id" if name == "pathvqa_pickle" else "empty_path"
        cases.append((name, "image", "", image_kind))  # image: "" is never a text-only record
    return cases


TYPE_CASES = _type_cases()


@pytest.mark.parametrize(
    "layout, logical, value, kind", TYPE_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]!r}"[:60] for c in TYPE_CASES]
)
def test_class1_a_field_has_one_type(capsys, tmp_path: Path, layout: str, logical: str, value: Any, kind: str) -> None:
    lay = LAYOUTS[layout]
    assert_bad_record(
        capsys, tmp_path, lay, lambda item, root: lay.set(item, logical, value), lay.fields[logical][0], kind
    )


CONVERSATION_CASES = {
    # case: (mutation of record 1, field, kind)
    "question_only_image_token": (
        lambda item: _conversation_value(0)(item, "<image>\n"),
        "conversations[0].value",
        "empty_question",
    ),
    "question_number": (lambda item: _conversation_value(0)(item, 7), "conversations[0].value", "wrong_type"),
    "answer_number": (lambda item: _conversation_value(1)(item, 7), "conversations[1].value", "wrong_type"),
    "value_missing": (lambda item: item["conversations"][1].pop("value"), "conversations[1].value", "missing_field"),
    "image_list_of_two": (lambda item: item.update(image=[item["image"], item["image"]]), "image", "multiple_images"),
    "image_number": (lambda item: item.update(image=3), "image", "wrong_type"),
    "id_list": (lambda item: item.update(id=["a"]), "id", "wrong_type"),
    "id_bool": (lambda item: item.update(id=True), "id", "wrong_type"),
    "modality_list": (lambda item: item.update(modality=["CT"]), "modality", "wrong_type"),
    "answer_type_number": (lambda item: item.update(answer_type=1), "answer_type", "wrong_type"),
    "image_token_without_image": (lambda item: item.pop("image"), "conversations[0].value", "missing_image"),
}


# MeCoVQA takes the modality from the image name (no modality field to get wrong)
CONVERSATION_PAIRS = [
    (layout, case)
    for layout in ("conversation", "mecovqa")
    for case in sorted(CONVERSATION_CASES)
    if not (layout == "mecovqa" and case == "modality_list")
]


@pytest.mark.parametrize(("layout", "case"), CONVERSATION_PAIRS)
def test_class1_conversation_fields(capsys, tmp_path: Path, layout: str, case: str) -> None:
    mutate, field_name, kind = CONVERSATION_CASES[case]
    if layout == "mecovqa" and case == "image_token_without_image":
        field_name, kind = "image", "missing_field"  # MeCoVQA records always have an image
    assert_bad_record(capsys, tmp_path, LAYOUTS[layout], lambda item, root: mutate(item), field_name, kind)


@pytest.mark.parametrize("layout", ["vqa_rad", "slake", "pathvqa_pickle"])
@pytest.mark.parametrize(
    "value, kind", [(1.5, "wrong_type"), (True, "wrong_type"), ([1], "wrong_type"), ("", "empty_id")]
)
def test_class1_ids(capsys, tmp_path: Path, layout: str, value: Any, kind: str) -> None:
    lay = LAYOUTS[layout]
    assert_bad_record(capsys, tmp_path, lay, lambda item, root: lay.set(item, "id", value), lay.fields["id"][0], kind)


def test_class1_numbers_are_answers_only_where_the_release_writes_them(tmp_path: Path) -> None:
    """VQA-RAD writes counts as JSON numbers: an integer answer is its text; SLAKE's answers are strings."""
    vqa_rad, slake = LAYOUTS["vqa_rad"], LAYOUTS["slake"]
    vqa_rad.broken(tmp_path / "rad", lambda item, root: item.update(answer=3))
    records = read_split(vqa_rad.spec(tmp_path / "rad"), "vqa_rad", "train", ProblemLog())
    assert records[1].answer == "3"
    slake.broken(tmp_path / "slake", lambda item, root: item.update(answer=3))
    with pytest.raises(DataError, match=r"field 'answer': expected a string, got a number \(3\)"):
        read_split(slake.spec(tmp_path / "slake"), "slake", "train", ProblemLog())


# -- class 2: filters count what they remove; leakage between splits -----------------------------------------


def test_class2_slake_language_is_matched_in_any_case_and_null_is_counted(capsys, tmp_path: Path) -> None:
    from datamodules.writers.slake import write_slake

    root = tmp_path / "slake"
    write_slake(root, n_train=2, n_val=0, n_test=1, seed=5, size=SIZE, questions_per_image=3, zh_fraction=1.0)
    items = json.loads((root / "train.json").read_text())
    en = [k for k, i in enumerate(items) if i["q_lang"] == "en"]
    zh = len(items) - len(en)
    assert zh > 0
    items[en[0]]["q_lang"] = "EN"
    items[en[1]]["q_lang"] = " En "
    items[en[2]]["q_lang"] = None
    (root / "train.json").write_text(json.dumps(items, ensure_ascii=False))
    spec = DatasetSpec(format="slake", path=str(root), val_split=None, test_split=None)

    with pytest.raises(
        DataError, match=r"train.json: record \d+ \(id \d+\): field 'q_lang': null \(expected a string\)"
    ):
        read_split(spec, "slake", "train", ProblemLog("error"))
    problems = ProblemLog("skip")
    records = read_split(spec, "slake", "train", problems)
    assert len(records) == len(en) - 1  # "EN" and " En " kept, null counted
    assert problems.counts() == {"missing_field": 1} and problems.problems[0].field == "q_lang"
    assert sum(problems.filtered.values()) == zh  # the other language: left out by configuration, counted
    assert [r for r in records if r.extra["q_lang"] in ("EN", "En")]
    dm = VQADataModule(datasets={"s": spec}, on_bad_record="skip")
    dm.split_records("train")
    assert sum(dm.split_filtered["train"].values()) == zh and [p.field for p in dm.split_problems["train"]] == [
        "q_lang"
    ]
    upper = read_split(
        DatasetSpec(format="slake", path=str(root), languages=["EN"]), "slake", "train", ProblemLog("skip")
    )
    assert len(upper) == len(records)

    code, report = data_check(capsys, LAYOUTS["slake"], root)
    assert code == 1
    assert [p["field"] for p in report["problems"]] == ["q_lang"]
    (reason, count), *_ = report["splits"]["train"]["filtered"].items()
    assert count == zh and "q_lang 'zh' not in languages ['en']" in reason


def test_class2_max_samples_is_counted(tmp_path: Path) -> None:
    LAYOUTS["conversation"].write(tmp_path)
    problems = ProblemLog("skip")
    spec = DatasetSpec(format="conversation", path=str(tmp_path), max_samples=2)
    assert len(read_split(spec, "c", "train", problems)) == 2
    assert sum(problems.filtered.values()) == 4 and "max_samples=2" in next(iter(problems.filtered))


def _grounding_answer(value: str) -> Callable[[dict, Path], None]:
    def mutate(item: dict, root: Path) -> None:
        item["conversations"][1]["value"] = value.format(mask=item["conversations"][1]["value"].split("<mask>")[1][:-7])

    return mutate


def _float_mask(item: dict, root: Path) -> None:
    """A probability map saved as a float TIFF: thresholding it at 1 would give an empty target."""
    image = Image.open(root / item["image"])
    probabilities = np.linspace(0.0, 0.9, image.width * image.height, dtype=np.float32).reshape(image.height, -1)
    Image.fromarray(probabilities, mode="F").save(root / "masks_merged" / "soft.tif")
    item["conversations"][1]["value"] = "Sure, it is <SEG>. <mask>masks_merged/soft.tif</mask>"


MASK_CASES = {
    # case: (mutation of Grounding record 1, field, kind)
    "seg_without_mask": (_grounding_answer("Sure, it is <SEG>."), "conversations[1].value", "seg_without_mask"),
    "unclosed_mask": (_grounding_answer("Sure, it is <SEG>. <mask>{mask}"), "conversations[1].value", "bad_mask_tag"),
    "stray_close": (_grounding_answer("Sure, it is <SEG>. {mask}</mask>"), "conversations[1].value", "bad_mask_tag"),
    "two_segs": (_grounding_answer("<SEG> and <SEG>. <mask>{mask}</mask>"), "conversations[1].value", "bad_mask_tag"),
    "empty_mask_path": (
        _grounding_answer("Sure, it is <SEG>. <mask> </mask>"),
        "conversations[1].value",
        "missing_mask",
    ),
    "float_mask": (_float_mask, "mask_path", "bad_mask"),
    "seg_in_question": (
        lambda item, root: _conversation_value(0)(item, "<image>\nSegment it <SEG>."),
        "conversations[0].value",
        "bad_mask_tag",
    ),
    "region_in_answer": (
        _grounding_answer("Sure, it is <SEG> in <region>{mask}</region>. <mask>{mask}</mask>"),
        "conversations[1].value",
        "bad_region_tag",
    ),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_class2_mecovqa_grounding_targets(capsys, tmp_path: Path, case: str) -> None:
    mutate, field_name, kind = MASK_CASES[case]
    grounding = Layout(
        "mecovqa",
        _writer(_mecovqa),
        "MeCoVQA-Grounding.json",
        _json_io("MeCoVQA-Grounding.json"),
        CONVERSATION_FIELDS,
        None,
        options={"subsets": ["grounding"]},
    )
    if case == "float_mask":
        grounding.file = "soft.tif"  # decoding finds it: the problem names the mask file
    assert_bad_record(capsys, tmp_path, grounding, mutate, field_name, kind)


def test_class2_unclosed_region_tag(capsys, tmp_path: Path) -> None:
    region = Layout(
        "mecovqa",
        _writer(_mecovqa),
        "MeCoVQA-Region.json",
        _json_io("MeCoVQA-Region.json"),
        CONVERSATION_FIELDS,
        None,
        options={"subsets": ["region"]},
    )

    def unclose(item: dict, root: Path) -> None:
        item["conversations"][0]["value"] = item["conversations"][0]["value"].replace("</region>", "")

    assert_bad_record(capsys, tmp_path, region, unclose, "conversations[0].value", "bad_region_tag")


def _leak(layout: str) -> Callable[[Path], tuple[str, str]]:
    """Give a test record the id of a train record; returns (file, field) the leak is reported under."""

    def leak(root: Path) -> tuple[str, str]:
        lay = LAYOUTS[layout]
        if layout == "vqa_rad":  # one file: a test_freeform record with a train record's qid
            load, store = lay.io
            items = load(root)
            test = next(i for i in items if i["phrase_type"].startswith("test"))
            test["qid"] = items[1]["qid"]
            store(root, items)
            return lay.file, "qid"
        name, key = {
            "slake": ("test.json", "qid"),
            "pathvqa_pickle": ("qas/test_vqa.pkl", "question_id"),
            "conversation": ("test.json", "id"),
            "mecovqa": ("MeCoVQA_Complex_VQA_test.json", "id"),
        }[layout]
        load, store = (_pickle_io if name.endswith(".pkl") else _json_io)(name)
        train, test = lay.io[0](root), load(root)
        test[0][key] = train[1][key]
        store(root, test)
        return name, key

    return leak


@pytest.mark.parametrize("layout", ["vqa_rad", "slake", "pathvqa_pickle", "conversation", "mecovqa"])
def test_class2_an_id_in_two_splits_is_listed_as_leakage(capsys, tmp_path: Path, layout: str) -> None:
    lay = LAYOUTS[layout]
    lay.write(tmp_path)
    file, key = _leak(layout)(tmp_path)
    code, report = data_check(capsys, lay, tmp_path)
    assert code == 1
    (leak,) = report["problems"]
    assert leak["reason"].startswith("split_leakage: id also in split 'train'"), leak
    assert leak["file"].endswith(Path(file).name) and leak["field"] == key
    # training reads one split at a time: the leak is data check's finding, not a dropped record
    assert len(read_split(lay.spec(tmp_path), lay.fmt, "train", ProblemLog("error"))) > 0


# -- class 5: decompression bombs ----------------------------------------------------------------------------


@cache
def bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG of zeros: ~110 KB on disk, 900 M pixels when decoded (written in
    row chunks, never held in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compress = zlib.compressobj(9)
    rows = 1000
    idat = b"".join(compress.compress(row * rows) for _ in range(side // rows)) + compress.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_bomb_is_small_and_real() -> None:
    data = bomb_png()
    assert len(data) < 1 << 20
    with pytest.raises(Image.DecompressionBombError):  # what PIL raises on its own, uncaught before issue 16
        Image.open(io.BytesIO(data))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_class5_a_decompression_bomb_is_a_bad_record(capsys, tmp_path: Path, layout: str) -> None:
    lay = LAYOUTS[layout]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    assert_bad_record(
        capsys, tmp_path, lay, lambda item, root: lay.point_image(item, root, bomb_png()), "image", "image_too_large"
    )
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 300 << 10, f"the bomb was decoded: peak memory grew {grown >> 10} MiB"


def test_class5_the_message_and_the_loader(tmp_path: Path, tokenizer, transform) -> None:
    """The check reads the header only; a loader that meets a bomb (no verify_images) names it, never a PIL
    DecompressionBombError traceback."""
    from datamodules.dataset import VQADataset
    from datamodules.encoding import ConversationEncoder

    lay = LAYOUTS["conversation"]
    lay.broken(tmp_path, lambda item, root: lay.point_image(item, root, bomb_png()))
    records = read_split(lay.spec(tmp_path), "conversation", "train", ProblemLog())
    dataset = VQADataset(
        records, encoder=ConversationEncoder(tokenizer, num_image_tokens=4), transform=transform, with_answers=True
    )
    dataset[0]
    with pytest.raises(DataError) as info:
        dataset[1]
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'bomb.png'}: record conversation/")
    assert "field 'image': 900000000 pixels, more than max_image_pixels=89478485 (a decompression bomb?" in message


def test_class5_the_limit_is_configurable(capsys, tmp_path: Path, monkeypatch) -> None:
    from datamodules.images import image_size, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    lay = LAYOUTS["slake"]
    lay.write(tmp_path)
    image = next((tmp_path / "imgs").glob("*/source.jpg"))
    with pytest.raises(DataError, match=r"16x16 is 256 pixels, more than max_image_pixels=100") as info:
        load_image(image, record="r", max_pixels=100)
    assert info.value.problem.kind == "image_too_large"
    dm = VQADataModule(
        datasets={"s": lay.spec(tmp_path, max_image_pixels=100)}, on_bad_record="skip", verify_images=True
    )
    assert dm.split_records("train") == [] and set(dm.problems.counts()) == {"image_too_large"}
    code, report = data_check(capsys, lay, tmp_path, "--max-image-pixels", "100")
    assert code == 1 and {p["reason"].split(":")[0] for p in report["problems"]} == {"image_too_large"}
    assert report["checks"]["max_image_pixels"] == 100
    # a limit above PIL's own is honoured (PIL's is raised, never lowered); the header is all that is read
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    assert image_size(bomb, max_pixels=10**9) == (30000, 30000)
    assert DatasetSpec(path="x", max_image_pixels=0).problems("data.datasets.d") == [
        ("data.datasets.d.max_image_pixels", "must be > 0, got 0")
    ]
    assert DEFAULT_MAX_IMAGE_PIXELS == 89_478_485


# -- class 6: prompts longer than max_length -----------------------------------------------------------------

LONG = "Is there a lesion " * 6000  # ~100k characters


@pytest.fixture(scope="module")
def demo_prompt_checks():
    """The demo experiment's encoding (tiny Llama's template, 16 image tokens) at max_length 64."""
    from pipeline.data_check import config_prompt_checks

    return config_prompt_checks(str(REPO / "experiments" / "demo.yaml"), ["data.max_length=64"])


def _long_question(layout: str) -> Callable[[dict, Path], None]:
    lay = LAYOUTS[layout]
    image_token = "<image>\n" if lay.fmt in ("conversation", "mecovqa") else ""
    return lambda item, root: lay.set(item, "question", image_token + LONG)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_class6_a_prompt_longer_than_max_length(
    tmp_path: Path, layout: str, tokenizer, transform, demo_prompt_checks
) -> None:
    lay = LAYOUTS[layout]
    lay.broken(tmp_path, _long_question(layout))
    field_name = lay.fields["question"][0]

    def datamodule(policy: str) -> VQADataModule:
        return VQADataModule(datasets={"d": lay.spec(tmp_path)}, on_bad_record=policy, max_length=64).connect(
            tokenizer, transform, num_image_tokens=4
        )

    with pytest.raises(DataError) as info:
        datamodule("error").split_records("train")
    message = str(info.value)
    assert "\n" not in message and Path(lay.file).name in message and f"field '{field_name}'" in message, message
    assert "longer than data.max_length=64" in message and info.value.problem.kind == "prompt_too_long"

    dm = datamodule("skip")
    records = dm.split_records("train")
    assert dm.problems.counts() == {"prompt_too_long": 1} and "(prompt_too_long=1)" in dm.problems.summary()
    (problem,) = dm.split_problems["train"]
    assert problem.file.endswith(Path(lay.file).name) and problem.field == field_name
    assert LONG not in [r.question for r in records]
    batch = next(iter(dm.train_dataloader()))  # the run goes on without it
    assert batch["input_ids"].shape[1] <= 64

    report = check_dataset(lay.fmt, tmp_path, prompt_checks=demo_prompt_checks, **lay.options)
    (listed,) = report["problems"]
    assert listed["reason"].startswith("prompt_too_long: the prompt is") and listed["field"] == field_name
    assert report["checks"]["prompt_length"] == ["align: max_length 64, 16 image tokens"]


def test_class6_data_check_cli_with_a_config(capsys, tmp_path: Path) -> None:
    lay = LAYOUTS["slake"]
    lay.broken(tmp_path, _long_question("slake"))
    demo = str(REPO / "experiments" / "demo.yaml")
    assert (
        main(["data", "check", "--format", "slake", str(tmp_path), "--config", demo, "--set", "data.max_length=64"])
        == 1
    )
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "prompt lengths: align: max_length 64, 16 image tokens" in captured.out
    assert "field 'question': prompt_too_long: the prompt is" in captured.out
    # without --config the lengths are not checked, and the report says so
    assert main(["data", "check", "--format", "slake", str(tmp_path)]) == 0
    assert "prompt lengths: not checked" in capsys.readouterr().out
    assert main(["data", "check", "--format", "slake", str(tmp_path), "--set", "data.max_length=64"]) == 1
    captured = capsys.readouterr()
    assert (
        captured.err.startswith("medpipe: error: --set data.max_length=64 needs --config")
        and "Traceback" not in captured.err
    )


def test_class6_every_training_template_must_fit(tokenizer, transform) -> None:
    """With prompt templates, training draws any of a task's templates: each must fit, not just the first."""
    from datamodules.encoding import ConversationEncoder, fitting_records
    from datamodules.prompts import PromptTemplates
    from datamodules.records import Record

    record = Record(id="r", dataset="d", split="train", question="Is it?", answer="yes", answer_type="closed")
    encoder = ConversationEncoder(tokenizer, num_image_tokens=4, max_length=1)
    lengths = [encoder.prompt_length(v) for v in PromptTemplates().variants(record, every=True)]
    assert len(set(lengths)) == 3
    encoder.max_length = sorted(lengths)[1]  # the first template fits, a longer one does not
    problems = ProblemLog("skip")
    assert fitting_records([record], encoder, problems, prompts=PromptTemplates(), every_template=False) == [record]
    assert fitting_records([record], encoder, problems, prompts=PromptTemplates(), every_template=True) == []
    assert problems.counts() == {"prompt_too_long": 1}
