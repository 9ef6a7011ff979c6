"""Pairing by id, the side-by-side protocol report, and task metrics, against hand computations."""

from __future__ import annotations

import pytest

from lightningmodules.metrics.pairing import Pair, PairingError, Reference, pair_by_id
from lightningmodules.metrics.report import evaluation_report, flat_metrics, format_report
from medcore.ids import dedupe_by_id


def ref(i, answer, kind="closed", task="vqa", modality="CT", dataset="d"):
    return Reference(id=str(i), answer=answer, answer_type=kind, task=task, modality=modality, dataset=dataset)


def test_pairing_by_id_not_position() -> None:
    refs = [ref(1, "yes"), ref(2, "no")]
    pairs = pair_by_id([("2", "No."), ("1", "Yes")], refs)
    assert [(p.reference.id, p.prediction) for p in pairs] == [("1", "Yes"), ("2", "No.")]


@pytest.mark.parametrize(
    "predictions, message",
    [
        ([("1", "yes")], "1 of 2 references have no prediction: 2"),
        ([("1", "yes"), ("1", "no"), ("2", "no")], "occur more than once: 1"),
        ([("1", "yes"), ("2", "no"), ("7", "x")], "match no reference id: 7"),
    ],
)
def test_pairing_errors_name_the_ids(predictions, message) -> None:
    with pytest.raises(PairingError, match=message):
        pair_by_id(predictions, [ref(1, "yes"), ref(2, "no")])


def test_duplicate_reference_ids_are_an_error() -> None:
    with pytest.raises(PairingError, match="reference ids occur more than once: 1"):
        pair_by_id([("1", "yes")], [ref(1, "yes"), ref(1, "no")])


def test_padding_duplicates_dropped_keeping_first() -> None:
    preds = [{"question_id": "a", "text": "1"}, {"question_id": "b", "text": "2"}, {"question_id": "a", "text": "1"}]
    kept = dedupe_by_id(preds)
    assert [p["question_id"] for p in kept] == ["a", "b"] and kept[1] is preds[1]


def test_protocols_side_by_side_hand_values() -> None:
    refs = [ref(1, "no"), ref(2, "yes"), ref(3, "no"), ref(4, "left lung", "open"), ref(5, "CT", "open")]
    preds = {"1": "The image looks abnormal", "2": "Yes", "3": "no", "4": "the left side lung", "5": "MRI"}
    report = evaluation_report(pair_by_id(preds, refs))
    protocols = report["protocols"]
    # closed (ids 1-3). default: exact match after normalisation -> 2 ("yes" == "yes", "no" == "no") of 3
    assert protocols["default"]["closed_accuracy"] == pytest.approx(2 / 3)
    # med_moe: lowercase substring -> "no" in "the image looks abnormal" counts -> 3 of 3
    assert protocols["med_moe"]["closed_accuracy"] == pytest.approx(1.0)
    # llava_med: ("yes" or "no" in pred) and gt in pred -> id 1 hits via "abnormal" too -> 3 of 3
    assert protocols["llava_med"]["closed_accuracy"] == pytest.approx(1.0)
    # open (ids 4, 5): recall of gt tokens: {left, lung} in "left side lung" -> 1.0; {ct} in "mri" -> 0
    assert protocols["default"]["open_recall"] == pytest.approx(0.5)
    # token F1 of id 4: precision 2/3, recall 1 -> 0.8; id 5 -> 0 => mean 0.4
    assert protocols["medplib"]["open_f1"] == pytest.approx(0.4)
    assert protocols["default"]["closed_count"] == 3 and protocols["default"]["open_count"] == 2
    flat = flat_metrics(report)
    assert flat["closed_accuracy"] == pytest.approx(2 / 3)
    assert flat["protocol/med_moe/closed_accuracy"] == pytest.approx(1.0)
    text = format_report(report)
    assert "| closed_accuracy | 0.6667 | 1.0000 | 1.0000 |" in text


def test_breakdown_by_dataset_answer_type_and_modality() -> None:
    refs = [ref(1, "yes", modality="CT"), ref(2, "no", modality="MRI"), ref(3, "liver", "open", modality="CT")]
    report = evaluation_report(pair_by_id({"1": "yes", "2": "yes", "3": "liver"}, refs))
    rows = {(r["answer_type"], r["modality"]): (r["count"], r["score"]) for r in report["breakdown"]}
    assert rows == {("closed", "CT"): (1, 1.0), ("closed", "MRI"): (1, 0.0), ("open", "CT"): (1, 1.0)}


def test_task_metrics_rec_cls_and_caption() -> None:
    refs = [
        ref(1, "{<10><10><50><50>}", "open", task="refer"),
        ref(2, "{<0><0><20><20>}", "open", task="refer"),
        ref(3, "{<0><0><10><10>}", "open", task="refer"),
        ref(4, "pneumonia", "open", task="cls"),
        ref(5, "normal", "open", task="cls"),
        ref(6, "ct scan of the chest", "open", task="caption"),
    ]
    preds = {
        "1": "{<10><10><50><50>}",
        "2": "{<0><0><10><20>}",
        "3": "a box somewhere",
        "4": "Pneumonia.",
        "5": "pneumonia",
        "6": "ct scan of the chest",
    }
    report = evaluation_report(pair_by_id(preds, refs))
    rec = report["tasks"]["refer"]
    # IoUs: 1.0, 200/400 = 0.5 (not > 0.5), unparseable -> 0  => mIoU 0.5, acc@0.5 = 1/3
    assert rec["rec_miou"] == pytest.approx(0.5)
    assert rec["rec_acc@0.5"] == pytest.approx(1 / 3)
    assert rec["rec_unparseable"] == 1
    assert report["tasks"]["cls"]["accuracy"] == pytest.approx(0.5)
    assert report["tasks"]["caption"]["bleu4"] == pytest.approx(1.0)
    assert report["tasks"]["caption"]["rouge_l"] == pytest.approx(1.0)
    assert "protocols" in report and report["protocols"] == {}  # no VQA items


def test_empty_prediction_scores_zero() -> None:
    report = evaluation_report([Pair(ref(1, "yes"), ""), Pair(ref(2, "liver", "open"), "")])
    assert report["protocols"]["default"]["closed_accuracy"] == 0.0
    assert report["protocols"]["default"]["open_recall"] == 0.0


def test_segmentation_report_against_numpy() -> None:
    import numpy as np

    from lightningmodules.metrics.report import segmentation_report

    rng = np.random.default_rng(0)
    gts = [rng.random((9, 7)) > 0.6 for _ in range(4)] + [np.zeros((5, 5), bool)]
    logits = [rng.normal(size=g.shape) * 3 for g in gts[:3]] + [None, rng.normal(size=(5, 5))]
    out = segmentation_report(logits, gts, ["CT", "CT", "MRI", "MRI", "CT"], threshold=0.1)
    ious, dices = [], []
    for lg, gt in zip(logits, gts, strict=True):
        pred = np.zeros_like(gt) if lg is None else 1 / (1 + np.exp(-lg)) > 0.1
        union = (pred | gt).sum()
        iou = 0.0 if lg is None or union == 0 else (pred & gt).sum() / union
        ious.append(iou)
        dices.append(2 * iou / (1 + iou))
    assert out["miou"] == pytest.approx(np.mean(ious))
    assert out["mdice"] == pytest.approx(np.mean(dices))
    assert out["mdice/MRI"] == pytest.approx(np.mean(dices[2:4]))
    assert out["no_mask"] == 1 and out["count"] == 5
    # MONAI: plain Dice over the 4 non-empty ground truths, missing prediction = empty mask
    plain = []
    for lg, gt in zip(logits[:4], gts[:4], strict=True):
        pred = np.zeros_like(gt) if lg is None else 1 / (1 + np.exp(-lg)) > 0.1
        plain.append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    assert out["monai_dice"] == pytest.approx(np.mean(plain), abs=1e-6)
    assert out["monai_dice_count"] == 4
