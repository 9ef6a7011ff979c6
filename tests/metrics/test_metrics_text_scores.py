"""Per-sample text scores on hand-computed values."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lightningmodules.metrics import (
    corpus_bleu,
    cumulative_bleu,
    exact_match,
    rouge_l,
    sentence_bleu,
    token_f1,
    token_precision,
    token_prf,
    token_recall,
)
from lightningmodules.metrics.text_scores import individual_bleu, script_exact_match

TINY = 1e-70  # nltk's "zero" for a missing higher n-gram order is ~1e-77 or smaller


def test_exact_match_uses_normalisation():
    assert exact_match("The Left lung.", "left lung") == 1.0
    assert exact_match("left lung", "right lung") == 0.0
    assert exact_match("Two", "2") == 1.0


def test_token_scores_count_as_the_scripts_by_default():
    # the papers' calculate_f1score: a shared word adds its prediction count: tp = 2 + 1 = 3,
    # fp = 0, fn = 1 (nodule) -> precision 1, recall 3/4, f1 = 2*.75/1.75 = 6/7
    # (the clipped counting gave 2/3, 2/3, 2/3 here; it was the default before)
    assert token_prf("left left lung", "left lung nodule") == pytest.approx((1.0, 0.75, 6 / 7))
    assert token_prf("left left lung", "left lung nodule", counting="script") == pytest.approx((1.0, 0.75, 6 / 7))
    # datasets.md's example: "left left" against "left lung": tp 2, fn 1 -> recall 2/3
    assert token_recall("left left", "left lung") == pytest.approx(2 / 3)
    # repeated predicted word: tp 3, fp 0, fn 0 -> all 1 (clipped: precision 1/3)
    assert token_prf("lung lung lung", "lung") == (1.0, 1.0, 1.0)
    # pred [x, ray, of, chest], gt [x, ray]: tp 2, precision 2/4, recall 2/2, f1 = 2*.5*1/1.5
    assert token_precision("x-ray of chest", "X-Ray") == pytest.approx(0.5)
    assert token_recall("x-ray of chest", "X-Ray") == pytest.approx(1.0)
    assert token_f1("x-ray of chest", "X-Ray") == pytest.approx(2 / 3)


def test_token_scores_clipped_counting():
    # pred [left, left, lung], gt [left, lung, nodule]: tp = min(2,1) + 1 = 2
    # precision 2/3, recall 2/3, f1 2/3
    assert token_prf("left left lung", "left lung nodule", counting="clipped") == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert token_prf("lung lung lung", "lung", counting="clipped") == pytest.approx((1 / 3, 1.0, 0.5))
    assert token_recall("left left", "left lung", counting="clipped") == pytest.approx(1 / 2)


def test_script_exact_match_hand_values():
    # calculate_exactmatch: distinct reference words found in the prediction / prediction words
    assert script_exact_match("left lung", "The left lung") == 1.0
    assert script_exact_match("left lung lung", "left lung") == pytest.approx(2 / 3)
    assert script_exact_match("lung", "left lung") == 1.0  # not an exact match at all
    assert script_exact_match("x-ray of chest", "x-ray x-ray") == pytest.approx(2 / 4)  # [x ray] counted once each
    assert script_exact_match("", "lung") == 0.0
    assert script_exact_match("lung", "") == 0.0


@pytest.mark.parametrize("counting", ["script", "clipped"])
def test_token_scores_empty_and_disjoint(counting):
    assert token_prf("", "liver", counting) == (0.0, 0.0, 0.0)
    assert token_prf("liver", "", counting) == (0.0, 0.0, 0.0)
    assert token_prf("the", "liver", counting) == (0.0, 0.0, 0.0)  # "the" normalises to empty
    assert token_prf("ct scan", "mri", counting) == (0.0, 0.0, 0.0)


def test_token_scores_reject_unknown_counting():
    with pytest.raises(ValueError, match="counting"):
        token_recall("a", "b", counting="set")
    with pytest.raises(ValueError, match="counting"):
        token_recall("a", "b", counting="multiset")  # the old name of the clipped counting


def test_sentence_bleu_hand_values():
    # hyp [left, lung] (2) vs ref [left, lung, lesion] (3): bp = exp(1 - 3/2); p1 = p2 = 1
    bp = math.exp(-0.5)
    assert sentence_bleu("left lung", "left lung lesion", max_n=1) == pytest.approx(bp, abs=1e-15)
    assert sentence_bleu("left lung", "left lung lesion", max_n=2) == pytest.approx(bp, abs=1e-15)
    # no trigram in a 2-token hypothesis: nltk gives a tiny positive number, not 0
    b3 = sentence_bleu("left lung", "left lung lesion", max_n=3)
    assert 0 < b3 < TINY
    # hyp [x, ray, of, chest] vs ref [x, ray]: bp 1, p1 = 2/4, p2 = 1/3
    assert cumulative_bleu("x-ray of chest", "x-ray", 2) == pytest.approx([0.5, math.sqrt(1 / 6)])
    # individual bigram score via weights (0, 1): bp * p2 = 1/3
    assert sentence_bleu("x-ray of chest", "x-ray", weights=(0, 1)) == pytest.approx(1 / 3)
    # identical 4+ token texts score 1 at every order
    assert cumulative_bleu("small mass in left lung", "small mass in left lung") == pytest.approx([1.0] * 4)


def test_individual_bleu_hand_values():
    # hyp [x, ray, of, chest] vs ref [x, ray]: bp 1; p1 2/4, p2 1/3, p3 0/2, p4 0/1
    assert individual_bleu("x-ray of chest", "x-ray", 1) == pytest.approx(1 / 2)
    assert individual_bleu("x-ray of chest", "x-ray", 2) == pytest.approx(1 / 3)
    assert 0 < individual_bleu("x-ray of chest", "x-ray", 3) < 1e-300  # no smoothing: float_info.min
    # method1: a zero count becomes 0.1 / (hypothesis n-gram count)
    assert individual_bleu("x-ray of chest", "x-ray", 3, smoothing="method1") == pytest.approx(0.1 / 2)
    assert individual_bleu("x-ray of chest", "x-ray", 4, smoothing="method1") == pytest.approx(0.1 / 1)
    # no unigram match: 0 with or without smoothing; shorter hypothesis: brevity penalty applies
    assert individual_bleu("ct", "mri", 2, smoothing="method1") == 0.0
    assert individual_bleu("left lung", "left lung lesion", 2) == pytest.approx(math.exp(-0.5))
    with pytest.raises(ValueError):
        individual_bleu("a", "b", 5)
    with pytest.raises(ValueError, match="smoothing"):
        sentence_bleu("a", "b", smoothing="method7")


def test_sentence_bleu_zero_cases():
    assert sentence_bleu("", "left lung") == 0.0  # empty hypothesis
    assert sentence_bleu("left lung", "") == 0.0  # empty reference
    assert sentence_bleu("ct scan", "mri") == 0.0  # no unigram match -> exactly 0
    assert cumulative_bleu("", "") == [0.0] * 4


def test_corpus_bleu_hand_value():
    # statistics summed: p1 = (2+2)/(2+4), p2 = (1+1)/(1+3); hyp len 6 > ref len 4 -> bp 1
    value = corpus_bleu(["left lung", "x-ray of chest"], ["left lung", "x-ray"], max_n=2)
    assert value == pytest.approx(math.sqrt(4 / 6 * 2 / 4))
    assert corpus_bleu([], [], max_n=4) == 0.0
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [], max_n=1)


def test_rouge_l_hand_values():
    # LCS(left lower lung, left lung) = 2: P = 2/3, R = 1, F = 2PR/(P+R) = 0.8
    assert rouge_l("left lower lung", "left lung") == pytest.approx(0.8)
    assert rouge_l("lung left", "left lung") == pytest.approx(0.5)  # LCS 1: P = R = 1/2
    assert rouge_l("", "left lung") == 0.0
    assert rouge_l("ct", "mri") == 0.0


def test_token_lists_are_used_as_given():
    # a list is taken as ready-made tokens: "The" stays (it would be dropped from a string)
    assert token_recall(["The", "lung"], ["The", "lung"]) == 1.0
    assert sentence_bleu(["The", "lung"], "the lung", max_n=1) == pytest.approx(0.5)


def test_scoring_modules_do_not_import_reference_libraries():
    code = (
        "import sys, lightningmodules.metrics; "
        "bad = [m for m in ('nltk', 'rouge_score') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
