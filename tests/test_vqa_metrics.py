"""VQA torchmetrics wrappers, the majority baseline and the learning-rate schedule, by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from lightningmodules.metrics.baselines import majority_answers, majority_predictions
from lightningmodules.metrics.vqa_metrics import bleu1, closed_accuracy, open_recall
from lightningmodules.schedules import lr_lambda

# (prediction, ground truth, answer type); normalised forms in the comments
ITEMS = [
    ("Yes", "yes", "closed"),  # C1 "yes" == "yes"                    hit
    ("no.", "No", "CLOSED"),  # C2 "no" == "no"                      hit
    ("yes, it is", "yes", "yes/no"),  # C3 "yes it is" != "yes"              miss
    ("No", "yes", "close"),  # C4 "no" != "yes"                     miss
    ("left lung", "The left lung", "open"),  # O1 gt [left lung], both in pred      recall 1
    ("liver", "liver and spleen", "other"),  # O2 gt [liver and spleen], 1 of 3     recall 1/3
    ("heart", "brain", "number"),  # O3 no overlap                        recall 0
]
PREDS = [p for p, _, _ in ITEMS]
GTS = [g for _, g, _ in ITEMS]
TYPES = [t for _, _, t in ITEMS]

# closed accuracy (default protocol, normalised exact match): hits C1, C2 -> 2 / 4
CLOSED_ACC = 2 / 4
# open recall: (1 + 1/3 + 0) / 3 = 4/9
OPEN_RECALL = (1 + 1 / 3 + 0) / 3
# BLEU-1 = brevity penalty * clipped unigram precision, over all 7 items:
#   C1 1 | C2 1 | C3 p1 = 1/3, hyp 3 > ref 1 so BP = 1 -> 1/3 | C4 0
#   O1 1 | O2 p1 = 1/1, hyp 1 < ref 3: BP = exp(1 - 3/1) = exp(-2) | O3 0
BLEU1 = (1 + 1 + 1 / 3 + 0 + 1 + math.exp(-2) + 0) / 7  # = 0.49552...


def value(metric) -> float:
    return float(metric.compute())


@pytest.mark.parametrize(
    "factory, expected", [(closed_accuracy, CLOSED_ACC), (open_recall, OPEN_RECALL), (bleu1, BLEU1)]
)
def test_metric_on_hand_scored_list(factory, expected) -> None:
    m = factory()
    m.update(PREDS, GTS, TYPES)
    assert value(m) == pytest.approx(expected, abs=1e-12)


def test_hand_values_are_distinct() -> None:
    # guards the parametrised test above against a metric returning another metric's number
    assert len({round(CLOSED_ACC, 6), round(OPEN_RECALL, 6), round(BLEU1, 6)}) == 3
    assert BLEU1 == pytest.approx(0.495524, abs=1e-6)


@pytest.mark.parametrize("factory", [closed_accuracy, open_recall, bleu1])
def test_accumulation_over_two_updates(factory) -> None:
    one, two = factory(), factory()
    one.update(PREDS, GTS, TYPES)
    two.update(PREDS[:3], GTS[:3], TYPES[:3])
    two.update(PREDS[3:], GTS[3:], TYPES[3:])
    assert value(two) == pytest.approx(value(one), abs=1e-12)


def test_accumulation_is_a_sample_mean_not_a_mean_of_batch_means() -> None:
    # batch 1 = C1..C3 -> 2/3, batch 2 = C4 -> 0/1: sample mean 2/4, mean of means would be 1/3
    m = closed_accuracy()
    m.update(PREDS[:3], GTS[:3], TYPES[:3])
    m.update(PREDS[3:4], GTS[3:4], TYPES[3:4])
    assert value(m) == pytest.approx(0.5)


def test_answer_types_are_filtered() -> None:
    closed, opened = closed_accuracy(), open_recall()
    # an open item that would be a closed "hit" must not count for closed accuracy, and vice versa
    closed.update(["yes", "liver"], ["yes", "liver"], ["open", "closed"])
    assert value(closed) == 1.0  # only "liver"/"liver" (closed) counted: 1 / 1
    closed.update(["yes"], ["no"], ["closed"])
    assert value(closed) == 0.5  # 1 hit / 2 closed
    opened.update(["liver", "spleen"], ["liver", "liver"], ["closed", "open"])
    assert value(opened) == 0.0  # only "spleen" vs "liver" counted
    with pytest.raises(ValueError, match="answer_type"):
        closed_accuracy().update(["a"], ["a"], ["maybe"])


@pytest.mark.filterwarnings("ignore:.*compute.*called before the .*update:UserWarning")
def test_empty_returns_zero() -> None:
    for factory in (closed_accuracy, open_recall, bleu1):
        m = factory()
        assert value(m) == 0.0
        m.update([], [], [])
        assert value(m) == 0.0
    only_open = closed_accuracy()
    only_open.update(["liver"], ["liver"], ["open"])
    assert value(only_open) == 0.0  # no closed question seen


def test_reset_and_length_check() -> None:
    m = closed_accuracy()
    m.update(["yes"], ["yes"], ["closed"])
    assert value(m) == 1.0
    m.reset()
    m.update(["no"], ["yes"], ["closed"])
    assert value(m) == 0.0
    with pytest.raises(ValueError, match="same length"):
        m.update(["a", "b"], ["a"], ["closed"])


def test_closed_accuracy_protocol() -> None:
    # med_moe: lowercased ground truth substring of lowercased prediction
    #   C1 hit, C2 "no" in "no." hit, C3 "yes" in "yes, it is" hit, C4 "yes" in "no" miss -> 3/4
    m = closed_accuracy("med_moe")
    m.update(PREDS, GTS, TYPES)
    assert value(m) == pytest.approx(3 / 4)


# -- majority baseline ------------------------------------------------------------------------------


@dataclass
class QA:
    question: str
    answer: str


TRAIN = [
    QA("Is there a lesion?", "yes"),
    QA("Is there a lesion?", "yes"),
    QA("is there a lesion? ", "no"),  # same question after strip + lower
    QA("What organ?", "liver"),
    QA("What organ?", "lung"),  # tie 1:1 -> the first seen ("liver") wins
    QA("Which side?", "left"),
]
# overall counts: yes 2, no 1, liver 1, lung 1, left 1 -> "yes"


def test_majority_predictions() -> None:
    test = [QA("IS THERE A LESION?", "?"), QA("What organ?", "?"), QA("Which side?", "?"), QA("How many?", "?")]
    assert majority_predictions(TRAIN, test) == ["yes", "liver", "left", "yes"]
    table, overall = majority_answers(TRAIN)
    assert table == {"is there a lesion?": "yes", "what organ?": "liver", "which side?": "left"}
    assert overall == "yes"


def test_majority_needs_training_records() -> None:
    with pytest.raises(ValueError, match="at least one"):
        majority_predictions([], [QA("q", "a")])


# -- learning-rate schedule ----------------------------------------------------------------------------


def lam(step: int, scheduler: str = "cosine", *, total: int = 100, warmup: int = 10, floor: float = 0.0) -> float:
    return lr_lambda(step, total_steps=total, warmup_steps=warmup, scheduler=scheduler, min_lr_ratio=floor)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant"])
def test_warmup_is_linear(scheduler) -> None:
    # warmup 10 steps: (step + 1) / 10
    assert lam(0, scheduler) == pytest.approx(0.1)
    assert lam(4, scheduler) == pytest.approx(0.5)
    assert lam(9, scheduler) == pytest.approx(1.0)
    assert lam(10, scheduler) == pytest.approx(1.0)  # decay starts at progress 0


def test_cosine() -> None:
    # progress = (step - 10) / 90
    assert lam(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))  # progress 1/6 -> 0.9330127
    assert lam(25) == pytest.approx(0.9330127, abs=1e-7)
    assert lam(55) == pytest.approx(0.5)  # progress 1/2
    assert lam(100) == pytest.approx(0.0, abs=1e-12)  # progress 1
    assert lam(150) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    # min_lr_ratio 0.1: 0.1 + 0.9 * 0.5 = 0.55 halfway, 0.1 at the end
    assert lam(55, floor=0.1) == pytest.approx(0.55)
    assert lam(100, floor=0.1) == pytest.approx(0.1)


def test_linear() -> None:
    assert lam(28, "linear") == pytest.approx(0.8)  # progress 18/90 = 0.2
    assert lam(55, "linear") == pytest.approx(0.5)
    assert lam(100, "linear") == pytest.approx(0.0, abs=1e-12)
    assert lam(55, "linear", floor=0.2) == pytest.approx(0.2 + 0.8 * 0.5)  # 0.6


def test_constant() -> None:
    assert [lam(s, "constant") for s in (10, 55, 100, 1000)] == [1.0] * 4
    assert lam(55, "constant", floor=0.3) == 1.0  # the floor only applies to decaying schedules


def test_no_warmup() -> None:
    assert lam(0, warmup=0) == pytest.approx(1.0)
    assert lam(50, warmup=0) == pytest.approx(0.5)  # cosine, progress 50/100
    assert lam(50, "linear", warmup=0) == pytest.approx(0.5)
    # a 1-step run: progress (0 - 0) / max(1, 1) = 0
    assert lam(0, total=1, warmup=0) == pytest.approx(1.0)


def test_unknown_scheduler_is_rejected() -> None:
    with pytest.raises(ValueError):
        lam(55, "step")
