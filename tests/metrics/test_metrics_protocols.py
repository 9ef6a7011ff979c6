"""VQA protocols on a small hand-scored list."""

import math

import pytest

from lightningmodules.metrics import PROTOCOLS, closed_hit, open_scores, score_protocol

# Closed items with their normalised forms (p | g) to follow the hand counts below.
CLOSED = [
    ("No, the lung is normal.", "no"),  # 1  p "no lung is normal"      g "no"
    ("The findings are abnormal", "no"),  # 2  p "findings are abnormal"  g "no"
    ("Yes", "yes"),  # 3  p "yes"                    g "yes"
    ("Yes.", "No"),  # 4  p "yes"                    g "no"
    ("x-ray", "X ray"),  # 5  p "x ray"                  g "x ray"
    ("CT - x-ray", "x-ray"),  # 6  p "ct xray" (quirk)        g "x ray"
    ("Two", "2"),  # 7  p "2"                      g "2"
    ("yes, there is no fracture", "no"),  # 8  p "yes there is no fracture" g "no"
]
OPEN = [
    ("left lung", "The left lung"),  # O1 [left lung] vs [left lung]
    ("x-ray of chest", "X-Ray"),  # O2 [x ray of chest] vs [x ray]
    ("ct scan", "MRI"),  # O3 no overlap
    ("", "liver"),  # O4 empty prediction
    ("left left lung", "left lung nodule"),  # O5 repeated predicted word
]
ITEMS = [{"pred": p, "gt": g, "answer_type": "CLOSED"} for p, g in CLOSED] + [
    {"pred": p, "gt": g, "answer_type": "open"} for p, g in OPEN
]

# Closed hits per item 1..8:
#   default/medplib (normalised ==):      3, 5, 7                 -> 3/8
#   llava_med (yes|no in p, g in p):      1, 2 ("no" in abnormal), 3, 8
#                                         (5, 7: no yes/no in p)  -> 4/8
#   med_moe (lowercase substring):        1, 2, 3, 6 ("x-ray" in "ct - x-ray"), 8
#                                         (5: "x ray" not in "x-ray"; 7: "2" not in "two") -> 5/8
#   uni_med (normalised substring):       1, 2, 3, 5, 7, 8 (6: "x ray" not in "ct xray") -> 6/8
CLOSED_ACC = {"default": 3 / 8, "medplib": 3 / 8, "llava_med": 4 / 8, "med_moe": 5 / 8, "uni_med": 6 / 8}

# Open scores per item (multiset token counting):
#   recall: O1 2/2=1, O2 2/2=1, O3 0, O4 0, O5 min(2,1)+1=2 of 3 -> 2/3; mean (8/3)/5 = 8/15
#   f1:     O1 1, O2 P=2/4,R=1 -> 2/3, O3 0, O4 0, O5 P=R=2/3 -> 2/3; mean (7/3)/5 = 7/15
#   BLEU-1: O1 1 (bp exp(0)=1), O2 p1=2/4 (bp 1), O3 0, O4 0, O5 p1=2/3 (bp 1); mean (13/6)/5
#   BLEU-2: O1 sqrt(1*1), O2 sqrt(1/2 * 1/3), O5 sqrt(2/3 * 1/2) (bigram "left lung" only)
#   BLEU-3/4: no trigram match anywhere -> nltk's tiny values, ~0
OPEN_RECALL = 8 / 15
OPEN_F1 = 7 / 15
BLEU1 = 13 / 30
BLEU2 = (1 + math.sqrt(1 / 6) + math.sqrt(1 / 3)) / 5


def test_protocol_names():
    assert set(PROTOCOLS) == {"default", "llava_med", "med_moe", "uni_med", "medplib"}


@pytest.mark.parametrize("protocol", sorted(CLOSED_ACC))
def test_closed_accuracy(protocol):
    out = score_protocol(protocol, ITEMS)
    assert out["closed_count"] == 8 and out["open_count"] == 5
    assert out["closed_accuracy"] == pytest.approx(CLOSED_ACC[protocol])


@pytest.mark.parametrize("protocol", ["default", "llava_med", "med_moe"])
def test_recall_protocols(protocol):
    out = score_protocol(protocol, ITEMS)
    assert out["open_recall"] == pytest.approx(OPEN_RECALL)
    assert set(out) == {"closed_count", "open_count", "closed_accuracy", "open_recall"}


def test_uni_med_open():
    out = score_protocol("uni_med", ITEMS)
    assert out["open_f1"] == pytest.approx(OPEN_F1)
    assert out["bleu1"] == pytest.approx(BLEU1)
    assert out["bleu2"] == pytest.approx(BLEU2)
    assert out["bleu3"] == pytest.approx(0.0, abs=1e-70)
    assert out["bleu4"] == pytest.approx(0.0, abs=1e-70)
    assert "open_recall" not in out


def test_medplib_open():
    out = score_protocol("medplib", ITEMS)
    assert out["open_recall"] == pytest.approx(OPEN_RECALL)
    assert out["open_f1"] == pytest.approx(OPEN_F1)
    assert out["bleu1"] == pytest.approx(BLEU1)
    assert out["bleu2"] == pytest.approx(BLEU2)


def test_script_counting_option():
    # O5 under the scripts' counting: recall 3/4, f1 6/7 (others unchanged)
    out = score_protocol("medplib", ITEMS, counting="script")
    assert out["open_recall"] == pytest.approx((1 + 1 + 0 + 0 + 3 / 4) / 5)
    assert out["open_f1"] == pytest.approx((1 + 2 / 3 + 0 + 0 + 6 / 7) / 5)


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [("default", False), ("medplib", False), ("llava_med", True), ("med_moe", True), ("uni_med", True)],
)
def test_no_inside_abnormal(protocol, expected):
    assert closed_hit(protocol, "abnormal", "no") is expected
    assert closed_hit(protocol, "Normal.", "no") is expected  # "no" inside "normal" as well


def test_llava_med_requires_yes_or_no_in_prediction():
    assert closed_hit("llava_med", "left", "left") is False
    assert closed_hit("llava_med", "yes, left", "left") is True
    assert closed_hit("uni_med", "left", "left") is True


def test_llava_med_counts_every_closed_miss():
    # run_eval.py appends nothing for a miss whose prediction says yes/no, which would give 1/1;
    # here both items count.
    items = [
        {"pred": "yes", "gt": "yes", "answer_type": "closed"},
        {"pred": "yes", "gt": "no", "answer_type": "closed"},
    ]
    assert score_protocol("llava_med", items)["closed_accuracy"] == 0.5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_empty_prediction_and_empty_ground_truth(protocol):
    assert closed_hit(protocol, "", "yes") is False
    assert closed_hit(protocol, None, "yes") is False
    assert closed_hit(protocol, "yes", "") is False  # "" is in everything: never a hit
    assert all(v == 0.0 for v in open_scores(protocol, "", "left lung").values())
    assert all(v == 0.0 for v in open_scores(protocol, None, "left lung").values())


def test_groups_without_items_are_left_out():
    only_open = [{"pred": "left lung", "gt": "left lung", "answer_type": "OPEN"}]
    out = score_protocol("default", only_open)
    assert out == {"closed_count": 0.0, "open_count": 1.0, "open_recall": 1.0}
    out = score_protocol("medplib", [])
    assert out == {"closed_count": 0.0, "open_count": 0.0}


def test_answer_type_aliases():
    items = [{"pred": "yes", "gt": "yes", "answer_type": t} for t in ("close", "yes/no", " Closed ")]
    items += [{"pred": "2", "gt": "two", "answer_type": t} for t in ("other", "number")]
    out = score_protocol("default", items)
    assert out["closed_count"] == 3 and out["open_count"] == 2
    assert out["closed_accuracy"] == 1.0 and out["open_recall"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="llava_med.*med_moe.*uni_med.*medplib"):
        score_protocol("llava", ITEMS)
    with pytest.raises(ValueError, match="unknown protocol"):
        closed_hit("vqa", "yes", "yes")
    with pytest.raises(ValueError, match="item 1"):
        score_protocol("default", [ITEMS[0], {"pred": "a", "gt": "b", "answer_type": "free"}])
    with pytest.raises(ValueError, match="item 0 lacks key 'gt'"):
        score_protocol("default", [{"pred": "a", "answer_type": "open"}])
