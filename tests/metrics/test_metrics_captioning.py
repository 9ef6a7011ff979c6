"""Uni-Med report-generation scores against pycocoevalcap and the rouge package themselves.

The reference values come from a re-implementation, written here, of Uni-Med's eval_caption.py flow at
63b9dfb (texts as eval_caption.py:222 and the blip_caption_new processor keep them, evaluate_all's
filter, pycocoeval with PTBTokenizer + Bleu(4) / Meteor, the in-place normalisation of
calculate_meteor, calculate_rouge), which calls pycocoevalcap and rouge directly. Needs pycocoevalcap,
rouge and Java; skipped without them.
"""

from __future__ import annotations

import re
import shutil
import sys

import numpy as np
import pytest

from lightningmodules.metrics import captioning
from lightningmodules.metrics.captioning import (
    ScorerUnavailable,
    coco_bleu,
    ptb_tokenize,
    rouge_pkg_scores,
    uni_med_prediction_text,
    uni_med_reference_text,
    uni_med_report_scores,
)
from lightningmodules.metrics.pairing import Pair, Reference
from lightningmodules.metrics.report import evaluation_report, flat_metrics, format_report
from medcore.text import normalize_answer

pytest.importorskip("pycocoevalcap")
rouge_pkg = pytest.importorskip("rouge")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need Java")


# ------------------------------------------------------------------- the released flow, re-written


def _blip_caption_new(caption: str, max_words: int = 50) -> str:
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _released_rows(items):
    return [
        {"answer_pred": it["pred"].lower().replace("<unk>", "").strip(), "answer_gt": _blip_caption_new(it["gt"])}
        for it in items
    ]


def _coco(rows, scorer):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    res = tokenizer.tokenize({i: [{"caption": r["answer_pred"]}] for i, r in enumerate(rows)})
    gts = tokenizer.tokenize({i: [{"caption": r["answer_gt"]}] for i, r in enumerate(rows)})
    return scorer.compute_score(gts, res)[0]


def _released_caption_metrics(items, meteor=True):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor

    rows = [r for r in _released_rows(items) if r["answer_gt"] and r["answer_pred"]]
    out = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], _coco(rows, Bleu(4)), strict=True))
    for r in rows:  # calculate_meteor normalises the shared dicts in place ...
        r["answer_pred"], r["answer_gt"] = normalize_answer(r["answer_pred"]), normalize_answer(r["answer_gt"])
    if meteor:
        out["meteor"] = _coco(rows, Meteor())
    scores = {"rouge_1": [], "rouge_2": [], "rouge_l": []}
    for r in rows:  # ... and calculate_rouge normalises again
        pred, gt = normalize_answer(r["answer_pred"]), normalize_answer(r["answer_gt"])
        if not pred or not gt:
            continue
        s = rouge_pkg.Rouge().get_scores(pred, gt)[0]
        for key, name in (("rouge_1", "rouge-1"), ("rouge_2", "rouge-2"), ("rouge_l", "rouge-l")):
            scores[key].append(s[name]["f"])
    out.update({k: np.array(v).mean() for k, v in scores.items()})
    return out, len(rows)


LONG_REPORT = (
    "PA and lateral views of the chest.  The heart is normal in size.\n\nThe mediastinal and hilar contours are "
    "within normal limits. There is no pleural effusion or pneumothorax; the lungs are clear. Degenerative "
    "changes of the thoracic spine are noted, with a 3.5 cm calcified granuloma in the right upper lobe "
    "(unchanged). No acute cardiopulmonary process. Recommend follow-up in 6 months if clinically indicated."
)

ITEMS = [
    {
        "id": "a",
        "pred": "The heart size is normal. No acute cardiopulmonary process<unk>.",
        "gt": "The heart is normal in size. No (acute) cardiopulmonary process.",
    },
    {"id": "b", "pred": "Lungs are CLEAR.\nNo effusion, no pneumothorax.", "gt": "The lungs are clear. No effusion."},
    {"id": "c", "pred": "<unk> ", "gt": "Normal chest."},  # empty prediction: dropped
    {"id": "d", "pred": "the heart is normal in size. a 3.5 cm granuloma in the right upper lobe.", "gt": LONG_REPORT},
    {"id": "e", "pred": "Cardiomegaly.", "gt": "   "},  # empty reference: dropped
    {"id": "f", "pred": "normal", "gt": "Normal study."},  # one word: higher BLEU orders have no n-gram
    {"id": "g", "pred": "The", "gt": "the the"},  # empty once normalised: kept for BLEU, left out of ROUGE
    {"id": "h", "pred": "Heart heart heart normal normal.", "gt": "Heart normal, lungs normal."},  # repeats
]


# ----------------------------------------------------------------------------------------- tests


def test_texts_as_the_script_keeps_them():
    assert uni_med_prediction_text("  The <UNK>Heart<unk> \n") == "the heart"
    assert uni_med_prediction_text(None) == ""
    assert uni_med_reference_text(LONG_REPORT) == _blip_caption_new(LONG_REPORT)
    assert len(uni_med_reference_text(LONG_REPORT).split(" ")) == 50 < len(LONG_REPORT.split())
    assert uni_med_reference_text(LONG_REPORT, max_words=None) == re.sub(r"\s{2,}", " ", LONG_REPORT)
    # single spaces only split words for the cut: "a\nb" counts as one word, as in the processor
    text = " ".join(["w"] * 49) + " x\ny z"
    assert uni_med_reference_text(text) == _blip_caption_new(text) == " ".join(["w"] * 49) + " x\ny"


@needs_java
def test_full_metric_set_equals_the_released_flow_with_meteor():
    ours = uni_med_report_scores(ITEMS)
    expected, kept = _released_caption_metrics(ITEMS)
    assert {k: ours[k] for k in expected} == expected  # exact, not approximately
    assert ours["count"] == kept == 6 and ours["dropped_empty"] == 2
    assert 0 < ours["bleu4"] < ours["bleu1"] < 1 and 0 < ours["meteor"] < 1


@needs_java
@pytest.mark.parametrize(
    "items",
    [
        ITEMS[:1],
        [ITEMS[5]],  # only 1-grams: BLEU-2..4 are pycocoevalcap's tiny, not 0
        [ITEMS[3], ITEMS[7]],  # brevity penalty (short predictions against a long reference)
        [{"id": 1, "pred": "No acute process. The the heart (normal)!", "gt": "No acute process; the heart: normal."}],
    ],
)
def test_bleu_and_rouge_equal_the_packages(items):
    ours = uni_med_report_scores(items, meteor=False)
    expected, _ = _released_caption_metrics(items, meteor=False)
    assert {k: ours[k] for k in expected} == expected
    assert "meteor" not in ours


@needs_java
def test_bleu_on_ptb_tokens_keeps_articles_and_drops_punctuation():
    tokens = ptb_tokenize(["The heart (normal) isn't enlarged.", "A lung, the lobe!"])
    assert tokens == ["the heart -lrb- normal -rrb- is n't enlarged", "a lung the lobe"]
    # a line break the Java tokenizer splits at must not shift later items (pycocoevalcap would)
    assert ptb_tokenize(["a\rb", "c\u2028d", "z"]) == ["a b", "c d", "z"]


def test_coco_bleu_equals_pycocoevalcap_on_tokenised_text():
    from pycocoevalcap.bleu.bleu import Bleu

    cases = [
        (["the heart is normal", "no acute process"], ["the heart is normal in size", "no acute process"]),
        (["a a a a a"], ["a b a c"]),  # clipping
        (["normal"], ["normal study"]),
        (["", "the lungs are clear of any focal consolidation"], ["normal", "the lungs are clear"]),
    ]
    for hyps, refs in cases:
        expected, _ = Bleu(4).compute_score(
            {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}, verbose=0
        )
        assert coco_bleu(hyps, refs) == expected


@pytest.mark.parametrize(
    ("hyp", "ref"),
    [
        ("heart normal lungs clear", "lungs clear heart normal"),  # LCS ties: the package's backtracking
        ("a b a b a", "b a b"),  # repeated words: n-grams and LCS words are sets
        ("3.5 cm nodule in right lobe", "nodule 3.5 cm right upper lobe"),  # "." splits sentences
        ("x . . y", "y .  x"),  # pieces of spaces become empty sentences
        ("no effusion", "no effusion"),
        ("completely different", "words here"),
    ],
)
def test_rouge_equals_the_rouge_package(hyp, ref):
    s = rouge_pkg.Rouge().get_scores(hyp, ref)[0]
    assert rouge_pkg_scores(hyp, ref) == {
        "rouge_1": s["rouge-1"]["f"],
        "rouge_2": s["rouge-2"]["f"],
        "rouge_l": s["rouge-l"]["f"],
    }


def test_rouge_raises_where_the_package_does():
    for hyp, ref in (("...", "a"), ("a", "..")):
        with pytest.raises(ValueError) as expected:
            rouge_pkg.Rouge().get_scores(hyp, ref)
        with pytest.raises(ValueError, match=str(expected.value)):
            rouge_pkg_scores(hyp, ref)


def test_missing_java_or_pycocoevalcap_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(ScorerUnavailable, match="need Java on PATH") as err:
        uni_med_report_scores(ITEMS[:1])
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(ScorerUnavailable, match=r"need pycocoevalcap \(pip install 'medpipe\[coco\]'\)"):
        uni_med_report_scores(ITEMS[:1])
    # nothing to score needs neither
    assert uni_med_report_scores([{"pred": "", "gt": "x"}]) == {"count": 0.0, "dropped_empty": 1.0}


# ------------------------------------------------------------------------------- in the report


def _ref(i, answer, task, **extra):
    return Reference(id=str(i), answer=answer, answer_type="open", task=task, extra=extra)


@needs_java
def test_report_adds_uni_med_task_scores(monkeypatch):
    monkeypatch.setattr(captioning, "meteor_score", lambda hyps, refs: 0.25)  # METEOR's JVM is tested above
    pairs = [
        Pair(
            _ref("r1", "{<10><20><50><60>}", "refer", box=[64, 96, 256, 192], image_size=(640, 480)),
            "{<10><20><50><60>}",
        ),
        Pair(_ref("r2", "{<0><0><50><50>}", "refer", box=[0, 0, 50, 50], image_size=(100, 100)), "at {<0><0><50><50>}"),
        *(Pair(_ref(it["id"], it["gt"], "caption"), it["pred"]) for it in ITEMS),
    ]
    report = evaluation_report(pairs)
    refer, caption = report["tasks"]["refer"], report["tasks"]["caption"]
    assert refer["rec_miou"] == 1.0  # medpipe's grid rule reads a box anywhere in the answer
    assert refer["uni_med/miou"] == 0.5 and refer["uni_med/acc"] == 0.5 and refer["uni_med/unparseable"] == 1
    expected, _ = _released_caption_metrics(ITEMS, meteor=False)
    assert {k: caption[f"uni_med/{k}"] for k in expected} == expected
    assert caption["uni_med/meteor"] == 0.25 and caption["uni_med/count"] == 6
    assert "bleu1" in caption  # medpipe's per-sample BLEU stays, under its own name
    flat = flat_metrics(report)
    assert flat["task/refer/uni_med/miou"] == 0.5 and "task/caption/uni_med/bleu4" in flat
    assert "notes" not in report


def test_report_notes_what_it_could_not_score(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    pairs = [
        Pair(_ref("slake/refer/3/1", "{<0><0><50><50>}", "refer"), "{<0><0><50><50>}"),
        Pair(_ref("c1", "Normal chest.", "caption"), "normal chest"),
    ]
    report = evaluation_report(pairs)
    assert report["tasks"]["refer"]["rec_miou"] == 1.0
    assert not any(k.startswith("uni_med/") for task in report["tasks"].values() for k in task)
    notes = report["notes"]
    assert len(notes) == 2
    assert notes[0].startswith("task refer: uni_med scores not computed: record slake/refer/3/1:")
    assert "Java" in notes[1]
    assert "## Notes" in format_report(report)


def test_report_refer_only_needs_no_java_and_can_be_left_out(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    pairs = [
        Pair(_ref("r", "{<0><0><50><50>}", "refer", box=[0, 0, 50, 50], image_size=(100, 100)), "{<0><0><50><50>}")
    ]
    report = evaluation_report(pairs)
    assert report["tasks"]["refer"]["uni_med/miou"] == 1.0 and "notes" not in report
    lean = evaluation_report(pairs, protocol_tasks=False)
    assert "uni_med/miou" not in lean["tasks"]["refer"] and lean["tasks"]["refer"]["rec_miou"] == 1.0


def test_bleu_and_rouge_equal_the_packages_on_random_texts():
    import random

    from pycocoevalcap.bleu.bleu import Bleu

    rng = random.Random(15)
    pieces = ["heart", "lung", "normal", "no", "the", ".", " ", "  ", "3.5", "..", "left"]

    def text(k):
        return "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(rng.randint(1, k)))

    for _ in range(400):
        hyp, ref = text(12), text(12)
        try:
            s = rouge_pkg.Rouge().get_scores(hyp, ref)[0]
        except ValueError:
            with pytest.raises(ValueError):
                rouge_pkg_scores(hyp, ref)
            continue
        expected = {"rouge_1": s["rouge-1"]["f"], "rouge_2": s["rouge-2"]["f"], "rouge_l": s["rouge-l"]["f"]}
        assert rouge_pkg_scores(hyp, ref) == expected, (hyp, ref)
    words = ["a", "b", "c", "d"]
    for _ in range(200):
        n = rng.randint(1, 5)
        hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 7))) for _ in range(n)]
        refs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(n)]
        expected, _ = Bleu(4).compute_score(
            {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}, verbose=0
        )
        assert coco_bleu(hyps, refs) == expected, (hyps, refs)
