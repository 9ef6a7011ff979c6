"""``medpipe score`` on files in the original repositories' formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llava_med_predictions(tmp: Path, texts: dict) -> Path:
    return write_jsonl(
        tmp / "answers.jsonl",
        [
            {"question_id": qid, "prompt": "q", "text": t, "answer_id": "x", "model_id": "m", "metadata": {}}
            for qid, t in texts.items()
        ],
    )


def test_score_llava_med_predictions_against_conversation_json(tmp_path: Path, capsys) -> None:
    refs = tmp_path / "test.json"
    refs.write_text(
        json.dumps(
            [
                {
                    "id": 11,
                    "image": "a.jpg",
                    "answer_type": "CLOSED",
                    "conversations": [
                        {"from": "human", "value": "<image>\nIs it normal?"},
                        {"from": "gpt", "value": "No"},
                    ],
                },
                {
                    "id": 12,
                    "image": "b.jpg",
                    "answer_type": "OPEN",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhich organ?"},
                        {"from": "gpt", "value": "Liver"},
                    ],
                },
            ]
        )
    )
    preds = llava_med_predictions(tmp_path, {11: "It looks abnormal", 12: "the liver"})
    assert main(["score", "--protocol", "all", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"default", "llava_med", "llava_med_ad758b6", "med_moe", "uni_med", "medplib"}
    assert out["default"]["closed_accuracy"] == 0.0  # "it looks abnormal" != "no"
    assert out["med_moe"]["closed_accuracy"] == 1.0  # "no" is a substring of "abnormal"
    assert out["default"]["open_recall"] == 1.0
    # each protocol's complete metric set, under names that say the variant
    assert set(out["llava_med"]) >= {"open_recall", "open_f1", "open_bleu4_cumulative", "open_bleu3_individual"}
    assert set(out["med_moe"]) >= {"open_bleu1_individual_method1", "closed_f1"}
    assert set(out["uni_med"]) >= {"open_bleu4_cumulative", "closed_bleu1_cumulative", "all_f1"}
    # one protocol only
    assert (
        main(["score", "--protocol", "uni_med", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    )
    assert list(json.loads(capsys.readouterr().out)) == ["uni_med"]


def test_score_against_slake_test_file_keeps_english(tmp_path: Path, capsys) -> None:
    refs = tmp_path / "test.json"
    refs.write_text(
        json.dumps(
            [
                {
                    "qid": 1,
                    "img_name": "x/source.jpg",
                    "question": "Is this CT?",
                    "answer": "Yes",
                    "answer_type": "CLOSED",
                    "q_lang": "en",
                    "modality": "CT",
                },
                {
                    "qid": 2,
                    "img_name": "x/source.jpg",
                    "question": "是吗?",
                    "answer": "是",
                    "answer_type": "CLOSED",
                    "q_lang": "zh",
                    "modality": "CT",
                },
            ],
            ensure_ascii=False,
        )
    )
    preds = llava_med_predictions(tmp_path, {1: "yes"})
    assert (
        main(["score", "--protocol", "default", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["default"]["closed_accuracy"] == 1.0


def test_score_against_vqa_rad_release_uses_test_phrases(tmp_path: Path, capsys) -> None:
    refs = tmp_path / "VQA_RAD Dataset Public.json"
    refs.write_text(
        json.dumps(
            [
                {"qid": 5, "phrase_type": "freeform", "answer": "yes", "answer_type": "CLOSED"},
                {"qid": 6, "phrase_type": "test_freeform", "answer": 2, "answer_type": "OPEN "},
            ]
        )
    )
    preds = llava_med_predictions(tmp_path, {6: "two"})
    assert main(["score", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["default"]["open_recall"] == 1.0  # "two" -> "2"


def test_score_missing_prediction_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    refs = write_jsonl(
        tmp_path / "ours.jsonl",
        [
            {"question_id": "a", "text": "x", "answer": "yes", "answer_type": "closed"},
            {"question_id": "b", "text": "x", "answer": "no", "answer_type": "closed"},
        ],
    )
    preds = llava_med_predictions(tmp_path, {"a": "yes"})
    assert main(["score", "--predictions", str(preds), "--references", str(refs)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medpipe: error: 1 of 2 references have no prediction: b"]


def test_score_text_report_lists_protocols(tmp_path: Path, capsys) -> None:
    refs = write_jsonl(
        tmp_path / "ours.jsonl", [{"question_id": "a", "text": "x", "answer": "yes", "answer_type": "closed"}]
    )
    preds = llava_med_predictions(tmp_path, {"a": "yes"})
    assert main(["score", "--predictions", str(preds), "--references", str(refs)]) == 0
    out = capsys.readouterr().out
    assert "| closed_accuracy | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in out
    # the header names the released script each protocol follows, and the script's metric names
    assert out.startswith("# Evaluation report (1 predictions)\n\n## Protocols: the released scripts they follow")
    header = out.split("## Protocols\n")[0]
    for where in (
        "github.com/microsoft/LLaVA-Med @ b9a98a7, llava/eval/run_eval.py",
        "github.com/microsoft/LLaVA-Med @ ad758b6, llava/eval/run_eval.py",
        "github.com/jiangsongtao/Med-MoE @ 148cbd6, run_eval.py",
        "github.com/tsinghua-msiip/Uni-Med @ 63b9dfb, eval_vqa.py",
        "github.com/ShawnHuang497/MedPLIB @ 5ab54bc, model/eval/cal_metric.py",
    ):
        assert where in header
    assert "| llava_med | closed_accuracy | yes/no accuracy |" in header


def test_score_one_protocol_header_and_help(tmp_path: Path, capsys) -> None:
    refs = write_jsonl(
        tmp_path / "ours.jsonl", [{"question_id": "a", "text": "x", "answer": "yes", "answer_type": "closed"}]
    )
    preds = llava_med_predictions(tmp_path, {"a": "yes, no doubt"})
    args = ["score", "--protocol", "llava_med_ad758b6", "--predictions", str(preds), "--references", str(refs)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| llava_med_ad758b6 | github.com/microsoft/LLaVA-Med @ ad758b6" in out
    assert "Med-MoE" not in out  # only the protocol asked for
    assert main([*args[:2], "llava", *args[3:]]) == 1
    assert "unknown protocol 'llava'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    help_text = capsys.readouterr().out
    for name in ("default", "llava_med", "llava_med_ad758b6", "med_moe", "uni_med", "medplib"):
        assert f"  {name}: " in help_text
    assert "github.com/jiangsongtao/Med-MoE @ 148cbd6, run_eval.py" in help_text
    assert "SmoothingFunction().method1" in help_text


def test_unknown_reference_format(tmp_path: Path, capsys) -> None:
    refs = tmp_path / "weird.json"
    refs.write_text(json.dumps([{"foo": 1}]))
    preds = llava_med_predictions(tmp_path, {"a": "yes"})
    assert main(["score", "--predictions", str(preds), "--references", str(refs)]) == 1
    assert "cannot tell the reference format" in capsys.readouterr().err


def test_our_predictions_file_scores_uni_med_rec_in_pixels_like_the_run(tmp_path: Path) -> None:
    """predictions.jsonl carries each REC record's box and image size, so ``medpipe score`` on it gives the
    in-run evaluation's Uni-Med REC numbers (grid box scaled to the original pixels, eval_ref.py)."""
    from datamodules.records import Record
    from lightningmodules.vlm_module import prediction_row
    from pipeline.evaluation import llava_med_prediction, score_records
    from pipeline.score import score_files

    size, truth = (640, 480), (64.0, 96.0, 256.0, 192.0)  # (W, H); [x, y, w, h] pixels -> [64, 96, 320, 288]
    records = [
        Record(
            id=f"slake/refer/{i}",
            dataset="slake",
            split="test",
            question="[refer] where is the liver?",
            answer="{<10><20><50><60>}",
            answer_type="open",
            task="refer",
            box=truth,
            extra={"image_size": size},
        )
        for i in range(3)
    ]
    texts = {"slake/refer/0": "{<10><20><50><60>}", "slake/refer/1": "{<12><18><48><61>}", "slake/refer/2": "no box"}
    rows = [llava_med_prediction(prediction_row(r, texts[r.id]), "m") for r in records]
    assert rows[0]["box"] == list(truth) and rows[0]["image_size"] == list(size)
    path = write_jsonl(tmp_path / "predictions.jsonl", rows)
    in_run = score_records(texts, records)["tasks"]["refer"]
    scored = score_files(path, path)["tasks"]["refer"]
    assert scored["uni_med/miou"] == pytest.approx(in_run["uni_med/miou"]) and scored["uni_med/count"] == 3
    assert scored["uni_med/miou"] == pytest.approx((1.0 + rec_iou_by_hand() + 0.0) / 3)


def rec_iou_by_hand() -> float:
    """{<12><18><48><61>} on a 640 x 480 image: [76.8, 86.4, 307.2, 292.8] against [64, 96, 320, 288], +1 pixel."""
    p, t = (76.8, 86.4, 307.2, 292.8), (64.0, 96.0, 320.0, 288.0)
    inter = (min(p[2], t[2]) - max(p[0], t[0]) + 1) * (min(p[3], t[3]) - max(p[1], t[1]) + 1)
    area_p, area_t = (p[2] - p[0] + 1) * (p[3] - p[1] + 1), (t[2] - t[0] + 1) * (t[3] - t[1] + 1)
    return inter / (area_p + area_t - inter)
