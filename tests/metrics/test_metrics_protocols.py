"""VQA protocols on a small hand-scored list (the released scripts themselves, re-implemented, are in
test_metrics_released_scripts.py)."""

import math

import pytest

from lightningmodules.metrics import PROTOCOLS, closed_hit, open_scores, score_protocol
from lightningmodules.metrics.protocols import (
    PROTOCOL_SOURCES,
    closed_outcome,
    metric_label,
    protocol_sources_markdown,
    protocol_sources_text,
)

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
#   llava_med_ad758b6: the same hits; 4 ("yes" vs "no") is a miss whose prediction says yes/no,
#                                         so it leaves the denominator -> 4/7
#   med_moe (lowercase substring):        1, 2, 3, 6 ("x-ray" in "ct - x-ray"), 8
#                                         (5: "x ray" not in "x-ray"; 7: "2" not in "two") -> 5/8
#   uni_med (normalised substring):       1, 2, 3, 5, 7, 8 (6: "x ray" not in "ct xray") -> 6/8
CLOSED_ACC = {
    "default": 3 / 8,
    "medplib": 3 / 8,
    "llava_med": 4 / 8,
    "llava_med_ad758b6": 4 / 7,
    "med_moe": 5 / 8,
    "uni_med": 6 / 8,
}

# Open scores per item, counted as the scripts' calculate_f1score (a shared word adds its count in
# the prediction to tp):
#   recall:    O1 2/2=1, O2 2/2=1, O3 0, O4 0, O5 tp 2+1=3, fn 1 (nodule) -> 3/4; mean 2.75/5 = 11/20
#   precision: O1 1, O2 tp 2, fp 2 (of, chest) -> 1/2, O3 0, O4 0, O5 tp 3, fp 0 -> 1; mean 2.5/5
#   f1:        O1 1, O2 2/3, O3 0, O4 0, O5 2*(3/4)/(7/4) = 6/7; mean (1 + 2/3 + 6/7)/5 = 53/105
# (the clipped-multiset counting, before: recall 8/15, precision 13/30, f1 7/15: O5 2/3 each)
#   script exact match (distinct reference words found / prediction words):
#              O1 2/2, O2 2/4, O3 0, O4 0, O5 {left, lung} 2 / 3; mean (13/6)/5 = 13/30
#   BLEU-1:    O1 1 (bp exp(0)=1), O2 p1=2/4 (bp 1), O3 0, O4 0, O5 p1=2/3 (bp 1); mean (13/6)/5
#   BLEU-2 cumulative: O1 sqrt(1*1), O2 sqrt(1/2 * 1/3), O5 sqrt(2/3 * 1/2) (bigram "left lung" only)
#   BLEU-2 individual: O1 1, O2 1/3, O5 1/2; mean (11/6)/5 = 11/30
#   BLEU-3/4: no trigram match anywhere -> nltk's tiny values, ~0
OPEN_RECALL = 11 / 20
OPEN_PRECISION = 1 / 2
OPEN_F1 = 53 / 105
OPEN_SCRIPT_EXACT_MATCH = 13 / 30
BLEU1 = 13 / 30
BLEU2 = (1 + math.sqrt(1 / 6) + math.sqrt(1 / 3)) / 5
BLEU2_INDIVIDUAL = 11 / 30

# Med-MoE's BLEU splits the lowercased, not normalised texts and smooths with method1 (a zero count
# becomes 0.1 / n-gram count):
#   O1 [left lung] vs [the left lung]: bp exp(1 - 3/2); p1 = p2 = 1; p3 0 -> 0.1/1
#   O2 [x-ray of chest] vs [x-ray]: bp 1; p1 1/3; p2 0 -> 0.1/2; p3 0 -> 0.1/1
#   O5 [left left lung] vs [left lung nodule]: p1 2/3, p2 1/2, p3 0 -> 0.1/1; O3, O4 no unigram -> 0
E_HALF = math.exp(-0.5)
MED_MOE_BLEU = {
    "open_bleu1_individual_method1": (E_HALF + 1 / 3 + 2 / 3) / 5,
    "open_bleu2_individual_method1": (E_HALF + 0.05 + 0.5) / 5,
    "open_bleu3_individual_method1": (0.1 * E_HALF + 0.1 + 0.1) / 5,
}
# Closed items' recall / precision / F1 (Med-MoE and Uni-Med report them), normalised tokens:
#   1 [no lung is normal] vs [no]: P 1/4, R 1, F 2/5 | 2 0 | 3 1 | 4 0 | 5 1 | 6 0 | 7 1 |
#   8 [yes there is no fracture] vs [no]: P 1/5, R 1, F 1/3
CLOSED_F1 = (2 / 5 + 1 + 1 + 1 + 1 / 3) / 8  # = 7/15
CLOSED_PRECISION = (1 / 4 + 1 + 1 + 1 + 1 / 5) / 8  # = 69/160
CLOSED_RECALL = 5 / 8
# Uni-Med's closed BLEU-1 (normalised tokens): items 1 1/4, 3 1, 5 1, 7 1, 8 1/5; BLEU-2 only
# item 5 ([x ray] both) reaches 1, the rest are 0 or tiny.
CLOSED_BLEU1 = (1 / 4 + 1 + 1 + 1 + 1 / 5) / 8
CLOSED_BLEU2 = 1 / 8

LLAVA_MED_KEYS = {
    "closed_count",
    "open_count",
    "closed_accuracy",
    "open_script_exact_match",
    "open_recall",
    "open_precision",
    "open_f1",
    "open_bleu4_cumulative",
    "open_bleu1_individual",
    "open_bleu2_individual",
    "open_bleu3_individual",
}


def test_protocol_names():
    assert PROTOCOLS == ("default", "llava_med", "llava_med_ad758b6", "med_moe", "uni_med", "medplib")
    assert set(PROTOCOL_SOURCES) == set(PROTOCOLS)


@pytest.mark.parametrize("protocol", sorted(CLOSED_ACC))
def test_closed_accuracy(protocol):
    out = score_protocol(protocol, ITEMS)
    assert out["closed_count"] == 8 and out["open_count"] == 5
    assert out["closed_accuracy"] == pytest.approx(CLOSED_ACC[protocol])
    assert ("closed_excluded" in out) is (protocol == "llava_med_ad758b6")


def test_default_protocol():
    out = score_protocol("default", ITEMS)
    assert out == pytest.approx(
        {"closed_count": 8, "open_count": 5, "closed_accuracy": 3 / 8, "open_recall": OPEN_RECALL}
    )


@pytest.mark.parametrize("protocol", ["llava_med", "llava_med_ad758b6", "medplib"])
def test_llava_med_and_medplib_metric_set(protocol):
    out = score_protocol(protocol, ITEMS)
    extra = {"closed_excluded"} if protocol == "llava_med_ad758b6" else set()
    assert set(out) == LLAVA_MED_KEYS | extra
    assert out["open_recall"] == pytest.approx(OPEN_RECALL)
    assert out["open_precision"] == pytest.approx(OPEN_PRECISION)
    assert out["open_f1"] == pytest.approx(OPEN_F1)
    assert out["open_script_exact_match"] == pytest.approx(OPEN_SCRIPT_EXACT_MATCH)
    assert out["open_bleu1_individual"] == pytest.approx(BLEU1)
    assert out["open_bleu2_individual"] == pytest.approx(BLEU2_INDIVIDUAL)
    assert 0 < out["open_bleu3_individual"] < 1e-300  # method0: float_info.min for a zero count
    assert 0 < out["open_bleu4_cumulative"] < 1e-150


def test_med_moe_metric_set():
    out = score_protocol("med_moe", ITEMS)
    assert set(out) == {
        "closed_count",
        "open_count",
        "closed_accuracy",
        "open_script_exact_match",
        "open_recall",
        "open_precision",
        "open_f1",
        *MED_MOE_BLEU,
        "closed_f1",
        "closed_precision",
        "closed_recall",
    }
    assert out["open_recall"] == pytest.approx(OPEN_RECALL)
    assert out["open_precision"] == pytest.approx(OPEN_PRECISION)
    assert out["open_f1"] == pytest.approx(OPEN_F1)
    assert out["open_script_exact_match"] == pytest.approx(OPEN_SCRIPT_EXACT_MATCH)
    for key, value in MED_MOE_BLEU.items():
        assert out[key] == pytest.approx(value), key
    assert out["closed_f1"] == pytest.approx(CLOSED_F1) == 7 / 15
    assert out["closed_precision"] == pytest.approx(CLOSED_PRECISION) == 69 / 160
    assert out["closed_recall"] == pytest.approx(CLOSED_RECALL)


def test_uni_med_groups():
    out = score_protocol("uni_med", ITEMS)
    assert out["open_f1"] == pytest.approx(OPEN_F1)
    assert out["open_bleu1_cumulative"] == pytest.approx(BLEU1)
    assert out["open_bleu2_cumulative"] == pytest.approx(BLEU2)
    assert out["open_bleu3_cumulative"] == pytest.approx(0.0, abs=1e-70)
    assert out["open_bleu4_cumulative"] == pytest.approx(0.0, abs=1e-70)
    assert out["closed_f1"] == pytest.approx(CLOSED_F1)
    assert out["closed_bleu1_cumulative"] == pytest.approx(CLOSED_BLEU1)
    assert out["closed_bleu2_cumulative"] == pytest.approx(CLOSED_BLEU2, abs=1e-100)
    # "all": every question, closed and open together
    assert out["all_f1"] == pytest.approx((8 * CLOSED_F1 + 5 * OPEN_F1) / 13)
    assert out["all_bleu1_cumulative"] == pytest.approx((8 * CLOSED_BLEU1 + 5 * BLEU1) / 13)
    assert "open_recall" not in out and "open_precision" not in out


def test_clipped_counting_is_a_named_option():
    # O5 under the clipped-multiset counting: tp = min(2,1) + 1 = 2 -> precision = recall = f1 = 2/3
    out = score_protocol("medplib", ITEMS, counting="clipped")
    assert "open_recall" not in out and "open_f1" not in out
    assert out["open_recall_clipped"] == pytest.approx(8 / 15)
    assert out["open_precision_clipped"] == pytest.approx(13 / 30)
    assert out["open_f1_clipped"] == pytest.approx(7 / 15)
    assert out["open_bleu1_individual"] == pytest.approx(BLEU1)  # BLEU does not depend on it
    assert out["closed_accuracy"] == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="counting"):
        score_protocol("medplib", ITEMS, counting="multiset")


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("default", False),
        ("medplib", False),
        ("llava_med", True),
        ("llava_med_ad758b6", True),
        ("med_moe", True),
        ("uni_med", True),
    ],
)
def test_no_inside_abnormal(protocol, expected):
    assert closed_hit(protocol, "abnormal", "no") is expected
    assert closed_hit(protocol, "Normal.", "no") is expected  # "no" inside "normal" as well


def test_llava_med_requires_yes_or_no_in_prediction():
    assert closed_hit("llava_med", "left", "left") is False
    assert closed_hit("llava_med", "yes, left", "left") is True
    assert closed_hit("uni_med", "left", "left") is True


def test_llava_med_counts_every_closed_miss():
    # b9a98a7 (fix #35) counts every closed item; the first release (ad758b6) appended nothing for a
    # miss whose prediction says yes/no, so that miss left the denominator: 1/1.
    items = [
        {"pred": "yes", "gt": "yes", "answer_type": "closed"},
        {"pred": "yes", "gt": "no", "answer_type": "closed"},
    ]
    assert score_protocol("llava_med", items)["closed_accuracy"] == 0.5
    out = score_protocol("llava_med_ad758b6", items)
    assert out["closed_accuracy"] == 1.0 and out["closed_excluded"] == 1.0 and out["closed_count"] == 2.0


@pytest.mark.parametrize(
    ("pred", "gt", "outcome"),
    [
        ("not sure", "no", True),  # "no" inside "not": a hit for both LLaVA-Med rules
        ("yesterday", "yes", True),  # "yes" inside "yesterday"
        ("nodule", "yes", None),  # a miss that "says no" (inside "nodule"): left out by ad758b6
        ("Yes.", "no", None),
        ("left", "yes", False),  # no yes/no anywhere: a counted miss in both releases
        ("None", "no", False),  # "none" normalises to "0", which has no "no"
    ],
)
def test_llava_med_first_release_rule(pred, gt, outcome):
    assert closed_outcome("llava_med_ad758b6", pred, gt) is outcome
    assert closed_outcome("llava_med", pred, gt) is (outcome is True)
    assert closed_hit("llava_med_ad758b6", pred, gt) is (outcome is True)


def test_llava_med_first_release_with_every_closed_item_left_out():
    items = [{"pred": "yes", "gt": "no", "answer_type": "closed"}]
    out = score_protocol("llava_med_ad758b6", items)
    assert out["closed_accuracy"] == 0.0 and out["closed_excluded"] == 1.0  # run_eval.py:109 prints 0


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
    out = score_protocol("uni_med", only_open)
    assert not any(k.startswith("closed_") for k in out if k != "closed_count")
    assert out["all_f1"] == out["open_f1"] == 1.0
    for protocol in PROTOCOLS:
        assert score_protocol(protocol, []) == {"closed_count": 0.0, "open_count": 0.0}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_reported_metric_has_its_script_name(protocol):
    source = PROTOCOL_SOURCES[protocol]
    assert source.repo and source.commit and source.path and source.closed_rule and source.other_rules
    out = score_protocol(protocol, ITEMS)
    unnamed = {k for k in out if metric_label(protocol, k) is None}
    assert unnamed <= {"closed_count", "open_count", "closed_excluded"}
    # and the table names nothing the protocol does not report
    assert {key for key, _ in source.labels} <= set(out)


def test_sources_name_the_released_commits():
    expected = {
        "llava_med": ("microsoft/LLaVA-Med", "b9a98a7", "llava/eval/run_eval.py"),
        "llava_med_ad758b6": ("microsoft/LLaVA-Med", "ad758b6", "llava/eval/run_eval.py"),
        "med_moe": ("jiangsongtao/Med-MoE", "148cbd6", "run_eval.py"),
        "uni_med": ("tsinghua-msiip/Uni-Med", "63b9dfb", "eval_vqa.py"),
        "medplib": ("ShawnHuang497/MedPLIB", "5ab54bc", "model/eval/cal_metric.py"),
    }
    for name, (repo, commit, path) in expected.items():
        source = PROTOCOL_SOURCES[name]
        assert (source.repo, source.commit, source.path) == (repo, commit, path)
    table = protocol_sources_markdown()
    assert all(f"github.com/{repo} @ {commit}, {path}" in table for repo, commit, path in expected.values())
    assert "| med_moe | open_bleu2_individual_method1 | BLEU Score (Weight 2) |" in table
    text = protocol_sources_text()
    assert all(f"  {name}: " in text for name in PROTOCOLS)


def test_answer_type_aliases():
    items = [{"pred": "yes", "gt": "yes", "answer_type": t} for t in ("close", "yes/no", " Closed ")]
    items += [{"pred": "2", "gt": "two", "answer_type": t} for t in ("other", "number")]
    out = score_protocol("default", items)
    assert out["closed_count"] == 3 and out["open_count"] == 2
    assert out["closed_accuracy"] == 1.0 and out["open_recall"] == 1.0


def test_errors():
    with pytest.raises(ValueError, match="llava_med.*llava_med_ad758b6.*med_moe.*uni_med.*medplib"):
        score_protocol("llava", ITEMS)
    with pytest.raises(ValueError, match="unknown protocol"):
        closed_hit("vqa", "yes", "yes")
    with pytest.raises(ValueError, match="item 1"):
        score_protocol("default", [ITEMS[0], {"pred": "a", "gt": "b", "answer_type": "free"}])
    with pytest.raises(ValueError, match="item 0 lacks key 'gt'"):
        score_protocol("default", [{"pred": "a", "answer_type": "open"}])
