"""Each protocol against an independent re-implementation of its released evaluation script.

The ``_released_*`` functions below follow the scripts' own structure (word-count dicts, the
per-script normalisation calls, nltk's ``sentence_bleu`` with the released weights and smoothing,
the closed-question loops); they share nothing with ``lightningmodules.metrics`` but the answer
normalisation (``medcore.text.normalize_answer`` stands in for ``normalize_word``, which
tests/metrics/test_metrics_normalize.py checks on its own). The cases separate the variants:
repeated words, yes / no inside other words, raw versus normalised BLEU tokens, a closed miss that
"says" yes or no, and an answer with more than 32 periods (``normalize_word`` strips at most 32 per
call, and LLaVA-Med's and MedPLIB's recall / F1 normalise twice).

Scripts: LLaVA-Med llava/eval/run_eval.py at ad758b6 and b9a98a7; Med-MoE run_eval.py at 148cbd6;
MedPLIB model/eval/cal_metric.py at 5ab54bc; Uni-Med eval_vqa.py at 63b9dfb.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict

import pytest
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu

from lightningmodules.metrics.protocols import score_protocol
from lightningmodules.metrics.text_scores import individual_bleu, sentence_bleu
from lightningmodules.metrics.vqa_metrics import closed_accuracy
from medcore.text import normalize_answer as normalize_word

LONG = ". ".join(["lung"] * 40) + "."  # 40 periods: one normalisation keeps 8 of them

CASES = [
    # closed
    ("No, the lung is normal.", "no", "CLOSED"),
    ("The findings are abnormal", "no", "CLOSED"),  # "no" inside "abnormal"
    ("yes", "Yes", "CLOSED"),
    ("Yes.", "No", "CLOSED"),  # a miss that says yes: ad758b6 leaves it out
    ("not sure", "no", "CLOSED"),  # "no" inside "not"
    ("yesterday", "yes", "CLOSED"),  # "yes" inside "yesterday"
    ("nodule", "yes", "CLOSED"),  # a miss that "says" no
    ("left", "yes", "CLOSED"),  # no yes / no at all
    ("None", "no", "CLOSED"),  # "none" -> "0" when normalised; "no" in "none" when only lowercased
    ("x-ray", "X ray", "CLOSED"),
    ("CT - x-ray", "x-ray", "CLOSED"),
    ("Two", "2", "CLOSED"),
    ("yes, there is no fracture", "no", "CLOSED"),
    # open
    ("left left lung", "left lung nodule", "OPEN"),  # repeated predicted word
    ("lung lung lung", "lung", "OPEN"),
    ("left left", "left lung", "OPEN"),  # datasets.md's example: recall 2/3
    ("x-ray of chest", "X-Ray", "OPEN"),
    ("ct scan", "MRI", "OPEN"),
    ("", "liver", "OPEN"),
    ("The left lung.", "left lung", "OPEN"),  # raw tokens ["the", "left", "lung."] for Med-MoE's BLEU
    ("Left Lung", "the left lung", "OPEN"),
    ("small mass in the left upper lobe", "mass in left upper lobe", "OPEN"),
    ("there is a mass in the left lobe and a mass in the right lobe", "mass in left lobe of lung", "OPEN"),
    (LONG, "lung", "OPEN"),
    ("Two nodules, one in each lung.", "2", "OPEN"),
]


# ------------------------------------------------------------------ the released functions, re-done


def _word_counts(text: str) -> dict[str, int]:
    """utils.split_sentence(text, 1): counts of the lowercased whitespace words."""
    counts: dict[str, int] = defaultdict(int)
    for word in text.lower().strip().split():
        counts[word] += 1
    return counts


def _released_f1score(candidate: str, reference: str) -> tuple[float, float, float]:
    """evaluate_metrics.calculate_f1score -> (f1, precision, recall)."""
    cand, ref = _word_counts(normalize_word(candidate)), _word_counts(normalize_word(reference))
    tp = fp = fn = 0
    for word in set(cand) | set(ref):
        if word in cand and word in ref:
            tp += cand[word]
        elif word in cand:
            fp += cand[word]
        else:
            fn += ref[word]
    if not cand or not ref:
        return 0, 0, 0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    if tp == 0:
        return 0, 0, 0
    return 2 * precision * recall / (precision + recall), precision, recall


def _released_exactmatch(candidate: str, reference: str) -> float:
    """evaluate_metrics.calculate_exactmatch."""
    cand, ref = _word_counts(normalize_word(candidate)), _word_counts(normalize_word(reference))
    found = sum(1 for word in ref if word in cand)
    total = sum(cand.values())
    return 0 if total == 0 else found / total


def _bleu(ref: list[str], hyp: list[str], **kwargs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every zero-count order
        return nltk_sentence_bleu([ref], hyp, **kwargs)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _np_mean(values: list[float]) -> float:
    """np.array(values).mean(), as Uni-Med averages: nan (with a warning) for an empty group."""
    return _mean(values) if values else math.nan


def _released_llava_med(cases, *, first_release: bool, closed_rule: str = "llava_med") -> dict[str, float]:
    """LLaVA-Med run_eval.py evaluate() (and MedPLIB cal_metric.py evaluate(), closed_rule="exact")."""
    scores: dict[str, list[float]] = defaultdict(list)
    closed_hits: list[int] = []
    for pred, gt, answer_type in cases:
        gt_value, pred_value = normalize_word(gt.lower()), normalize_word(pred.lower())
        if answer_type == "OPEN":
            scores["open_script_exact_match"].append(_released_exactmatch(pred_value, gt_value))
            f1, precision, recall = _released_f1score(pred_value, gt_value)
            scores["open_f1"].append(f1)
            scores["open_precision"].append(precision)
            scores["open_recall"].append(recall)
            ref, hyp = str(gt_value).lower().split(), str(pred_value).lower().split()
            scores["open_bleu4_cumulative"].append(_bleu(ref, hyp))
            scores["open_bleu1_individual"].append(_bleu(ref, hyp, weights=(1, 0, 0, 0)))
            scores["open_bleu2_individual"].append(_bleu(ref, hyp, weights=(0, 1, 0, 0)))
            scores["open_bleu3_individual"].append(_bleu(ref, hyp, weights=(0, 0, 1, 0)))
        elif closed_rule == "exact":  # MedPLIB
            closed_hits.append(1 if gt_value == pred_value else 0)
        elif "yes" in pred_value or "no" in pred_value:
            if gt_value in pred_value:
                closed_hits.append(1)
            elif not first_release:  # the fix of b9a98a7; ad758b6 appended nothing here
                closed_hits.append(0)
        else:
            closed_hits.append(0)
    out = {key: _mean(values) for key, values in scores.items()}
    out["closed_accuracy"] = sum(closed_hits) / len(closed_hits) if closed_hits else 0.0
    return out


def _released_med_moe(cases) -> dict[str, float]:
    """Med-MoE run_eval.py evaluate()."""
    scores: dict[str, list[float]] = defaultdict(list)
    closed_count = closed_correct = 0
    smoothing = SmoothingFunction().method1
    for pred, gt, answer_type in cases:
        gt_value, pred_value = gt.lower(), pred.lower()
        f1, precision, recall = _released_f1score(pred_value, gt_value)
        if answer_type == "OPEN":
            scores["open_script_exact_match"].append(_released_exactmatch(pred_value, gt_value))
            scores["open_f1"].append(f1)
            scores["open_precision"].append(precision)
            scores["open_recall"].append(recall)
            for n, weights in enumerate([(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)], start=1):
                value = _bleu(gt_value.split(), pred_value.split(), weights=weights, smoothing_function=smoothing)
                scores[f"open_bleu{n}_individual_method1"].append(value)
        else:
            scores["closed_f1"].append(f1)
            scores["closed_precision"].append(precision)
            scores["closed_recall"].append(recall)
            closed_count += 1
            closed_correct += gt_value in pred_value
    out = {key: _mean(values) for key, values in scores.items()}
    out["closed_accuracy"] = closed_correct / closed_count
    return out


def _released_uni_med(cases) -> dict[str, float]:
    """Uni-Med eval_vqa.py evaluate_open_and_closed()."""

    def bleu_and_f1(subset) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in range(1, 5):
            weights = (1.0 / n,) * n
            out[f"bleu{n}_cumulative"] = _np_mean(
                [
                    _bleu(normalize_word(gt).split(), normalize_word(pred).split(), weights=weights)
                    for pred, gt, _ in subset
                ]
            )
        out["f1"] = _np_mean([_released_f1score(pred, gt)[0] for pred, gt, _ in subset])
        return out

    # eval_vqa.py lowercases the generated answer before scoring (lines 197, 246)
    cases = [(pred.lower(), gt, answer_type) for pred, gt, answer_type in cases]
    closed = [c for c in cases if c[2] == "CLOSED"]
    out: dict[str, float] = {}
    for group, subset in (("open", [c for c in cases if c[2] == "OPEN"]), ("closed", closed), ("all", cases)):
        out.update({f"{group}_{key}": value for key, value in bleu_and_f1(subset).items()})
    out["closed_accuracy"] = _np_mean(
        [1 if normalize_word(gt) in normalize_word(pred) else 0 for pred, gt, _ in closed]
    )
    return out


RELEASED = {
    "llava_med": lambda cases: _released_llava_med(cases, first_release=False),
    "llava_med_ad758b6": lambda cases: _released_llava_med(cases, first_release=True),
    "medplib": lambda cases: _released_llava_med(cases, first_release=False, closed_rule="exact"),
    "med_moe": _released_med_moe,
    "uni_med": _released_uni_med,
}


def _items(cases) -> list[dict[str, str]]:
    return [{"pred": p, "gt": g, "answer_type": t} for p, g, t in cases]


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol", sorted(RELEASED))
def test_protocol_equals_its_released_script(protocol):
    expected = RELEASED[protocol](CASES)
    ours = score_protocol(protocol, _items(CASES))
    ours = {k: v for k, v in ours.items() if k not in ("closed_count", "open_count", "closed_excluded")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=0), key


def test_the_cases_separate_the_variants():
    llava, first, med_moe, medplib, uni_med = (
        RELEASED[name](CASES) for name in ("llava_med", "llava_med_ad758b6", "med_moe", "medplib", "uni_med")
    )
    assert first["closed_accuracy"] > llava["closed_accuracy"]  # the first release's inflation
    assert len({llava["closed_accuracy"], medplib["closed_accuracy"], med_moe["closed_accuracy"]}) == 3
    # Uni-Med's and Med-MoE's totals happen to agree here, item by item they do not
    for case, med_moe_hit in ((("None", "no", "CLOSED"), 1.0), (("x-ray", "X ray", "CLOSED"), 0.0)):
        assert RELEASED["med_moe"]([case])["closed_accuracy"] == med_moe_hit
        assert RELEASED["uni_med"]([case])["closed_accuracy"] == 1.0 - med_moe_hit
        for protocol in ("med_moe", "uni_med"):
            ours = score_protocol(protocol, _items([case]))["closed_accuracy"]
            assert ours == RELEASED[protocol]([case])["closed_accuracy"]
    # smoothed raw-token BLEU (Med-MoE) against unsmoothed normalised-token BLEU (LLaVA-Med)
    for n in (1, 2, 3):
        assert med_moe[f"open_bleu{n}_individual_method1"] != pytest.approx(llava[f"open_bleu{n}_individual"])
    # twice-normalised (LLaVA-Med, MedPLIB) against once-normalised (Med-MoE) recall / F1: the long answer
    assert llava["open_precision"] != pytest.approx(med_moe["open_precision"])
    assert llava["open_f1"] == pytest.approx(medplib["open_f1"])
    # the scripts' counting against the clipped one
    clipped = score_protocol("llava_med", _items(CASES), counting="clipped")
    assert clipped["open_recall_clipped"] < llava["open_recall"]


def test_llava_med_first_release_counts_as_released():
    ours = score_protocol("llava_med_ad758b6", _items(CASES))
    # closed misses whose normalised prediction contains yes / no: "Yes." vs no, "nodule" vs yes
    assert ours["closed_excluded"] == 2
    assert ours["closed_count"] == 13
    metric = closed_accuracy("llava_med_ad758b6")
    metric.update([p for p, _, _ in CASES], [g for _, g, _ in CASES], [t for _, _, t in CASES])
    assert float(metric.compute()) == pytest.approx(ours["closed_accuracy"], rel=1e-12)
    assert int(metric.count) == 11


def test_released_first_release_with_no_closed_item_left_is_zero():
    cases = [("yes", "no", "CLOSED"), ("left lung", "left lung", "OPEN")]
    assert _released_llava_med(cases, first_release=True)["closed_accuracy"] == 0.0
    assert score_protocol("llava_med_ad758b6", _items(cases))["closed_accuracy"] == 0.0


# ----------------------------------------------------------- BLEU variants against nltk, at random

VOCAB = ["left", "right", "lung", "lobe", "mass", "no", "yes", "liver", "ct", "the", "a", "two", "upper"]


def _random_pairs(seed: int, n: int) -> list[tuple[list[str], list[str]]]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        hyp = [rng.choice(VOCAB) for _ in range(rng.randint(0, 8))]
        if i % 2:
            ref = list(hyp)
            for _ in range(rng.randint(0, 2)):
                if ref and rng.random() < 0.5:
                    ref[rng.randrange(len(ref))] = rng.choice(VOCAB)
                else:
                    ref.insert(rng.randint(0, len(ref)), rng.choice(VOCAB))
        else:
            ref = [rng.choice(VOCAB) for _ in range(rng.randint(0, 8))]
        pairs.append((hyp, ref))
    return pairs


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("smoothing", [None, "method1"])
def test_individual_bleu_equals_nltk(n, smoothing):
    weights = tuple(1 if order == n else 0 for order in range(1, 5))
    function = SmoothingFunction().method1 if smoothing else None
    for hyp, ref in _random_pairs(7 + n, 300):
        expected = _bleu(ref, hyp, weights=weights, smoothing_function=function)
        assert individual_bleu(hyp, ref, n, smoothing=smoothing) == expected, (hyp, ref)


def test_cumulative_bleu4_equals_nltk_default_weights():
    for hyp, ref in _random_pairs(3, 300):
        assert sentence_bleu(hyp, ref, weights=(0.25, 0.25, 0.25, 0.25)) == _bleu(ref, hyp), (hyp, ref)


def test_method1_matters_only_for_missing_orders():
    # a zero bigram count: method1 gives 0.1 / 2 where method0 gives float_info.min
    hyp, ref = ["x-ray", "of", "chest"], ["x-ray"]
    assert individual_bleu(hyp, ref, 2, smoothing="method1") == pytest.approx(0.05)
    assert individual_bleu(hyp, ref, 2) < 1e-300
    assert individual_bleu(hyp, ref, 1, smoothing="method1") == individual_bleu(hyp, ref, 1) == pytest.approx(1 / 3)
    assert math.isclose(_bleu(ref, hyp, weights=(0, 1, 0, 0), smoothing_function=SmoothingFunction().method1), 0.05)


ANSWER_WORDS = ["yes", "No", "not", "yesterday", "nodule", "None", "left", "lung", "Lung.", "x-ray", "the", "two", "2"]


@pytest.mark.parametrize("protocol", sorted(RELEASED))
def test_protocol_equals_its_released_script_on_random_answers(protocol):
    rng = random.Random(11)
    cases = []
    for i in range(300):
        pred = " ".join(rng.choice(ANSWER_WORDS) for _ in range(rng.randint(0, 6)))
        gt = " ".join(rng.choice(ANSWER_WORDS) for _ in range(rng.randint(1, 3)))
        cases.append((pred, gt, "CLOSED" if i % 2 else "OPEN"))
    # the project never counts an empty normalised ground truth as a closed hit (module docstring)
    cases = [c for c in cases if normalize_word(c[1]) and c[1].strip()]
    expected = RELEASED[protocol](cases)
    ours = score_protocol(protocol, _items(cases))
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=0), key
