"""Own BLEU / ROUGE-L against nltk and rouge-score on random short sentence pairs."""

import math
import random
import warnings

import pytest
from nltk.translate import bleu_score as nltk_bleu
from rouge_score import rouge_scorer

from lightningmodules.metrics import corpus_bleu, cumulative_bleu, rouge_l, sentence_bleu
from medcore.text import tokens

# Small vocabulary so that n-gram matches are frequent; "the"/"a" and number words exercise the
# normalisation, which both sides share through tokens().
VOCAB = [
    "left",
    "right",
    "lung",
    "lobe",
    "mass",
    "no",
    "yes",
    "liver",
    "ct",
    "mri",
    "lesion",
    "the",
    "a",
    "two",
    "upper",
    "lower",
]


def _sentence(rng: random.Random, max_len: int = 7) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(0, max_len)))


def _edited(rng: random.Random, text: str) -> str:
    """A reference made from the hypothesis by a few edits, so that long n-grams match too."""
    words = text.split()
    for _ in range(rng.randint(0, 2)):
        op = rng.random()
        if op < 0.4 and words:
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
        elif op < 0.7:
            words.insert(rng.randint(0, len(words)), rng.choice(VOCAB))
        elif words:
            del words[rng.randrange(len(words))]
    return " ".join(words)


def _pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """Half independent pairs, half hypothesis/edited-copy pairs."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        pred = _sentence(rng, 9)
        pairs.append((pred, _edited(rng, pred) if i % 2 else _sentence(rng)))
    return pairs


def _nltk_sentence(pred: str, gt: str, weights) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every zero-count order
        return nltk_bleu.sentence_bleu([tokens(gt)], tokens(pred), weights=weights)


def _assert_same(ours: float, ref: float) -> None:
    assert abs(ours - ref) <= 1e-12
    # also the tiny non-zero values nltk produces for a missing order, relatively
    assert (ours == 0) == (ref == 0)
    if ref:
        assert ours / ref == pytest.approx(1.0, abs=1e-9)


def test_random_pairs_cover_edge_cases():
    pairs = _pairs(0, 400)
    lengths = [(len(tokens(p)), len(tokens(g))) for p, g in pairs]
    assert any(h == 0 for h, _ in lengths) and any(r == 0 for _, r in lengths)
    assert any(0 < h < 4 for h, _ in lengths)
    # some pairs have unigram overlap but no 4-gram match (the tiny-score case)
    assert any(0 < sentence_bleu(p, g) < 1e-70 for p, g in pairs)
    assert sum(sentence_bleu(p, g) > 0.3 for p, g in pairs) > 50
    assert any(sentence_bleu(p, g) == 1.0 for p, g in pairs)


@pytest.mark.parametrize("max_n", [1, 2, 3, 4])
def test_cumulative_sentence_bleu_matches_nltk(max_n):
    weights = (1.0 / max_n,) * max_n
    for pred, gt in _pairs(max_n, 400):
        ours = sentence_bleu(pred, gt, max_n=max_n)
        _assert_same(ours, _nltk_sentence(pred, gt, weights))
        _assert_same(cumulative_bleu(pred, gt, 4)[max_n - 1], ours)


@pytest.mark.parametrize("weights", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0.5, 0.5, 0, 0), (0.1, 0.2, 0.3, 0.4)])
def test_weighted_sentence_bleu_matches_nltk(weights):
    # the papers' scripts use (1,0,0,0), (0,1,0,0), (0,0,1,0) as BLEU-1/2/3
    for pred, gt in _pairs(10, 300):
        _assert_same(sentence_bleu(pred, gt, weights=weights), _nltk_sentence(pred, gt, weights))


@pytest.mark.parametrize("max_n", [1, 2, 4])
def test_corpus_bleu_matches_nltk(max_n):
    rng = random.Random(100 + max_n)
    weights = (1.0 / max_n,) * max_n
    for _ in range(150):
        pairs = [(_sentence(rng, 9), _sentence(rng, 9)) for _ in range(rng.randint(1, 8))]
        preds, gts = [p for p, _ in pairs], [g for _, g in pairs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = nltk_bleu.corpus_bleu([[tokens(g)] for g in gts], [tokens(p) for p in preds], weights=weights)
        _assert_same(corpus_bleu(preds, gts, max_n=max_n), ref)


def test_corpus_bleu_differs_from_mean_sentence_bleu():
    preds, gts = ["left lung mass", "ct"], ["left lung", "mri of brain"]
    mean = sum(sentence_bleu(p, g, max_n=1) for p, g in zip(preds, gts, strict=True)) / 2
    assert not math.isclose(corpus_bleu(preds, gts, max_n=1), mean)


def test_rouge_l_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, gt in _pairs(7, 400):
        # rouge-score tokenises on its own: feed it the normalised text so both see the same tokens
        ref = scorer.score(" ".join(tokens(gt)), " ".join(tokens(pred)))["rougeL"].fmeasure
        assert abs(rouge_l(pred, gt) - ref) <= 1e-12
