"""Issue 16, classes 1 and 9 for ``medpipe score`` and ``medpipe evaluate``: every bad file or record is one
``medpipe: error:`` line naming the file (and record and field), never a traceback; a field of the wrong type
is never read as its Python string form; ``--on-bad-record skip`` leaves such records out, counted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
NAN = math.nan


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))  # NaN is written as the JSON extension NaN, which Python reads back
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def slake_row(qid, answer="Yes", **extra) -> dict:
    return {"qid": qid, "img_name": "x/source.jpg", "question": "Is it?", "answer": answer, "answer_type": "CLOSED",
            "q_lang": "en", "modality": "CT", **extra}  # fmt: skip


def conversation_row(rid, answer="No", **extra) -> dict:
    return {"id": rid, "image": "a.jpg", "answer_type": "CLOSED",
            "conversations": [{"from": "human", "value": "<image>\nIs it normal?"}, {"from": "gpt", "value": answer}],
            **extra}  # fmt: skip


def ours_row(qid, answer="no", **extra) -> dict:
    return {"question_id": qid, "text": "x", "answer": answer, "answer_type": "closed", **extra}


def predictions(tmp: Path, texts: dict, name: str = "answers.jsonl") -> Path:
    return write_jsonl(tmp / name, [{"question_id": qid, "prompt": "q", "text": t} for qid, t in texts.items()])


def score(capsys, preds: Path, refs: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["score", "--predictions", str(preds), "--references", str(refs), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medpipe: error: "), err
    return lines[0]


# --- references: (file name, content writer, what the one line must say) -------------------------------------


def _slake_without_qid(tmp: Path) -> Path:
    row = slake_row(2)
    del row["qid"]
    return write_json(tmp / "slake_test.json", [slake_row(1), row])


def _mixed_formats(tmp: Path) -> Path:
    return write_json(tmp / "mixed.json", [slake_row(1), conversation_row(2)])


def _message_a_string(tmp: Path) -> Path:
    row = conversation_row(2)
    row["conversations"] = ["<image>\nIs it normal?", {"from": "gpt", "value": "No"}]
    return write_json(tmp / "conv.json", [conversation_row(1), row])


def _conversations_not_a_list(tmp: Path) -> Path:
    return write_json(tmp / "conv.json", [conversation_row(1), {**conversation_row(2), "conversations": "hi"}])


def _gpt_value_null(tmp: Path) -> Path:
    return write_json(tmp / "conv.json", [conversation_row(1), conversation_row(2, answer=None)])


def _not_utf8(tmp: Path) -> Path:
    path = tmp / "latin1.json"
    path.write_bytes(json.dumps([slake_row(1, answer="Oui")]).replace("Oui", "Ou\u00ef").encode("latin-1"))
    return path


def _deeply_nested(tmp: Path) -> Path:
    path = tmp / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def _deeply_nested_jsonl(tmp: Path) -> Path:
    path = tmp / "deep.jsonl"
    path.write_text(json.dumps(ours_row(1)) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    return path


def _row_not_an_object(tmp: Path) -> Path:
    return write_json(tmp / "slake_test.json", [slake_row(1), "qid 2: yes"])


REFERENCE_CASES = {
    "slake row without qid": (_slake_without_qid, ["record 1: field 'qid': missing"]),
    "mixed formats": (_mixed_formats, ["record 1 (id '2')", "a conversation JSON record in a SLAKE file"]),
    "message a plain string": (_message_a_string, ["record 1 (id '2')", "field 'conversations[0]'", "got a string"]),
    "conversations not a list": (_conversations_not_a_list, ["field 'conversations'", "got a string"]),
    "gpt value null": (_gpt_value_null, ["field 'conversations[1].value': expected a string, got null"]),
    "not utf-8": (_not_utf8, ["not UTF-8 text (byte 0xef at offset"]),
    "deeply nested json": (_deeply_nested, ["JSON nested too deeply to read"]),
    "deeply nested jsonl line": (_deeply_nested_jsonl, ["line 2: JSON nested too deeply to read"]),
    "row not an object": (_row_not_an_object, ["record 1: field '-': expected an object, got a string"]),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_a_bad_reference_file_is_one_line_naming_it(case: str, tmp_path: Path, capsys) -> None:
    make, expected = REFERENCE_CASES[case]
    refs = make(tmp_path)
    preds = predictions(tmp_path, {1: "yes", 2: "no"})
    code, out, err = score(capsys, preds, refs)
    assert code == 1 and out == ""
    line = one_line(err)
    assert str(refs) in line
    for part in expected:
        assert part in line


# --- a field of the wrong type, in every reference format and in predictions ---------------------------------

WRONG = {"null": None, "list": ["no"], "object": {"a": "no"}, "boolean": False, "nan": NAN}
WRONG_WORDS = {"null": "null", "list": "a list", "object": "an object", "boolean": "a boolean", "nan": "non-finite"}
REFERENCE_FORMATS = {
    "slake": lambda bad: [slake_row(1), slake_row(2, answer=bad)],
    "vqa_rad": lambda bad: [
        {"qid": 1, "phrase_type": "test_freeform", "answer": "yes", "answer_type": "CLOSED"},
        {"qid": 2, "phrase_type": "test_freeform", "answer": bad, "answer_type": "CLOSED"},
    ],
    "conversation": lambda bad: [conversation_row(1), conversation_row(2, answer=bad)],
    "predictions": lambda bad: [ours_row(1), ours_row(2, answer=bad)],
}
ANSWER_FIELD = {
    "slake": "answer",
    "vqa_rad": "answer",
    "conversation": "conversations[1].value",
    "predictions": "answer",
}


@pytest.mark.parametrize("kind", list(WRONG))
@pytest.mark.parametrize("fmt", list(REFERENCE_FORMATS))
def test_a_reference_answer_of_the_wrong_type_names_file_record_and_field(
    fmt: str, kind: str, tmp_path: Path, capsys
) -> None:
    refs = write_json(tmp_path / f"{fmt}.json", REFERENCE_FORMATS[fmt](WRONG[kind]))
    code, _, err = score(capsys, predictions(tmp_path, {1: "yes", 2: "no"}), refs)
    assert code == 1
    line = one_line(err)
    assert f"{refs}: record 1 (id '2'): field '{ANSWER_FIELD[fmt]}': " in line
    assert WRONG_WORDS[kind] in line


@pytest.mark.parametrize("kind", list(WRONG))
def test_a_prediction_text_of_the_wrong_type_names_file_record_and_field(kind: str, tmp_path: Path, capsys) -> None:
    refs = write_json(tmp_path / "conv.json", [conversation_row(1), conversation_row(2)])
    preds = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 1, "text": "no"}, {"question_id": 2, "text": 0}])
    preds.write_text(preds.read_text().replace('"text": 0', f'"text": {json.dumps(WRONG[kind])}'))
    code, _, err = score(capsys, preds, refs)
    assert code == 1
    line = one_line(err)
    assert f"{preds}: record 1 (id '2'): field 'text': expected a string, got " in line
    assert WRONG_WORDS[kind] in line


@pytest.mark.parametrize("bad", [None, ["a"], {"a": 1}, True, 1.5, ""])
def test_a_prediction_id_of_the_wrong_type_names_the_field(bad, tmp_path: Path, capsys) -> None:
    refs = write_json(tmp_path / "conv.json", [conversation_row(1)])
    preds = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": bad, "text": "no"}])
    code, _, err = score(capsys, preds, refs)
    assert code == 1
    assert f"{preds}: record 0: field 'question_id': " in one_line(err)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("answer_type", ["closed"], "field 'answer_type': expected a string, got a list"),
        ("q_lang", None, "field 'q_lang': expected a string, got null"),
        ("modality", 3, "field 'modality': expected a string, got a number"),
        ("qid", True, "field 'qid': expected a string or an integer id, got a boolean"),
    ],
)
def test_other_reference_fields_of_the_wrong_type(field: str, value, says: str, tmp_path: Path, capsys) -> None:
    refs = write_json(tmp_path / "slake.json", [slake_row(1), {**slake_row(2), field: value}])
    code, _, err = score(capsys, predictions(tmp_path, {1: "yes", 2: "no"}), refs)
    assert code == 1
    line = one_line(err)
    assert line.startswith(f"medpipe: error: {refs}: record 1") and says in line


def test_a_null_prediction_is_never_the_string_none(tmp_path: Path, capsys) -> None:
    """The med_moe rule counts a closed answer correct when the reference is a substring of the prediction:
    "None" contains "no". A null is an error, and under skip it is left out of every metric, counted."""
    refs = write_json(tmp_path / "conv.json", [conversation_row(1, answer="No"), conversation_row(2, answer="No")])
    preds = write_jsonl(
        tmp_path / "answers.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": None}]
    )
    code, _, err = score(capsys, preds, refs, "--json")
    assert code == 1
    assert f"{preds}: record 1 (id '2'): field 'text': expected a string, got null" in one_line(err)
    assert "--on-bad-record skip" in err

    code, out, err = score(capsys, preds, refs, "--json", "--on-bad-record", "skip")
    assert code == 0
    scores = json.loads(out)
    assert scores["med_moe"]["closed_accuracy"] == 0.0  # one pair scored: "yes" against "no"
    assert "Traceback" not in err
    assert "skipped 1 bad records (wrong_type=1); scored 1 of 2 references" in err
    assert f"{preds}: record 1 (id '2'): field 'text': expected a string, got null [wrong_type]" in err


def test_skip_counts_in_the_text_report_and_in_the_report(tmp_path: Path, capsys) -> None:
    from pipeline.score import score_files

    refs = write_json(tmp_path / "slake.json", [slake_row(1), slake_row(2, answer=None), slake_row(3)])
    preds = write_jsonl(
        tmp_path / "answers.jsonl",
        [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "yes"}, {"question_id": 3, "text": ["yes"]}],
    )
    code, out, err = score(capsys, preds, refs, "--on-bad-record", "skip")
    assert code == 0
    assert "Scored 1 of 3 references; skipped 2 (empty_field=0" not in out  # only kinds that occurred
    assert "Scored 1 of 3 references; skipped 2 (wrong_type=2)." in out
    assert "skipped 2 bad records (wrong_type=2); scored 1 of 3 references" in err
    records = score_files(preds, refs, on_bad_record="skip")["records"]
    assert records == {
        "n_expected": 3,
        "n_scored": 1,
        "n_skipped": 2,
        "skipped": {"wrong_type": 2},
        "left_out": {},
        "left_out_predictions": 0,
    }


def test_languages_match_case_insensitively_and_left_out_rows_are_counted(tmp_path: Path, capsys) -> None:
    refs = write_json(
        tmp_path / "slake.json",
        [slake_row(1, q_lang="EN"), slake_row(2, q_lang="en"), slake_row(3, answer="\u662f", q_lang="zh")],
    )
    preds = predictions(tmp_path, {1: "yes", 2: "yes", 3: "\u662f"})  # a prediction for every language
    code, out, err = score(capsys, preds, refs, "--protocol", "default")
    assert code == 0
    assert "Scored 2 of 2 references; left out 1 (q_lang not in en)." in out
    assert "left out 1 references the released scripts do not score (q_lang not in en)" in err
    assert "left out 1 predictions of those references" in err


def test_numeric_reference_answers_are_their_decimal_text(tmp_path: Path, capsys) -> None:
    refs = write_json(
        tmp_path / "vqa_rad.json", [{"qid": 6, "phrase_type": "test_freeform", "answer": 2, "answer_type": "OPEN"}]
    )
    code, out, _ = score(capsys, predictions(tmp_path, {6: "2"}), refs, "--json")
    assert code == 0 and json.loads(out)["default"]["open_recall"] == 1.0


def test_a_non_utf8_prediction_file_names_it(tmp_path: Path, capsys) -> None:
    refs = write_json(tmp_path / "conv.json", [conversation_row(1)])
    preds = tmp_path / "answers.jsonl"
    preds.write_bytes(b'{"question_id": 1, "text": "n\xe9"}\n')
    code, _, err = score(capsys, preds, refs)
    assert code == 1
    assert one_line(err) == (f"medpipe: error: {preds}: not UTF-8 text (byte 0xe9 at offset 29); save it as UTF-8")


# --- medpipe evaluate ckpt=<not a hand-over> --------------------------------------------------------------------


def _text_file(path: Path) -> None:
    path.write_text("these are not weights\n")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    import torch

    torch.save({"format": 1, "state_dict": {"w": torch.zeros(64)}, "meta": {}}, path)
    path.write_bytes(path.read_bytes()[:200])


def _refused_pickle(path: Path) -> None:
    import torch

    torch.save({"format": 1, "state_dict": {}, "meta": {}, "hook": print}, path)


def _plain_pickle(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"format": 1, "state_dict": {}}))


def _a_list(path: Path) -> None:
    import torch

    torch.save([1, 2, 3], path)


def _state_not_tensors(path: Path) -> None:
    import torch

    torch.save({"format": 1, "state_dict": {"w": [1.0, 2.0]}, "meta": {}}, path)


CHECKPOINT_CASES = {
    "text file": (_text_file, "not a torch file (it starts with b'these are not we')"),
    "empty file": (_empty, "the file is empty"),
    "truncated": (_truncated, "a corrupt or truncated torch file"),
    "code in the pickle": (_refused_pickle, "it holds a Python object (print), which torch.load(weights_only=True)"),
    "plain pickle": (_plain_pickle, "a plain pickle, not a torch.save zip file"),
    "a list": (_a_list, "(format 1): it holds a list"),
    "state dict of lists": (_state_not_tensors, "field 'state_dict.w': expected a tensor, got list"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_evaluate_a_file_that_is_no_hand_over_is_one_line(case: str, tmp_path: Path, capsys) -> None:
    make, says = CHECKPOINT_CASES[case]
    ckpt = tmp_path / "handover.pt"
    make(ckpt)
    code = main(
        [
            "evaluate",
            str(DEMO),
            f"ckpt={ckpt}",
            f"output_dir={tmp_path}/out",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 1
    line = one_line(err)
    assert line.startswith(f"medpipe: error: {ckpt}: not a medpipe hand-over checkpoint")
    assert says in line
    assert not (tmp_path / "mlflow.db").exists()  # refused before a run was opened
