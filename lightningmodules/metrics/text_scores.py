"""Per-sample text scores on normalised tokens: exact match, token recall/precision/F1, BLEU, ROUGE-L.

BLEU reproduces ``nltk.translate.bleu_score`` (nltk 3.10, no smoothing) number for number, and
ROUGE-L reproduces ``rouge_score``'s rougeL F-measure, without importing either library.
Texts given as ``str`` are normalised and split; a list of strings is taken as ready-made tokens.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Sequence

from medcore.text import normalize_answer, tokens

__all__ = [
    "TextOrTokens",
    "corpus_bleu",
    "cumulative_bleu",
    "exact_match",
    "rouge_l",
    "sentence_bleu",
    "token_f1",
    "token_precision",
    "token_prf",
    "token_recall",
]

TextOrTokens = str | Sequence[str]

COUNTING_MODES = ("multiset", "script")


def _toks(text: TextOrTokens | None) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return tokens(text)
    return list(text)


def exact_match(pred: str, gt: str) -> float:
    """1.0 when the normalised texts are identical, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gt))


def token_prf(pred: TextOrTokens, gt: TextOrTokens, counting: str = "multiset") -> tuple[float, float, float]:
    """(precision, recall, F1) of normalised whitespace tokens; all 0 if either side is empty.

    ``counting="multiset"``: tp = sum over words of min(count in pred, count in gt).
    ``counting="script"``: the papers' ``calculate_f1score``: a word present on both sides adds its
    *prediction* count to tp, so repeated predicted words inflate tp (kept for reproduction only).
    """
    if counting not in COUNTING_MODES:
        raise ValueError(f"counting must be one of {COUNTING_MODES}, got {counting!r}")
    p_counts, g_counts = Counter(_toks(pred)), Counter(_toks(gt))
    if not p_counts or not g_counts:
        return 0.0, 0.0, 0.0
    if counting == "multiset":
        tp = sum(min(c, g_counts[w]) for w, c in p_counts.items() if w in g_counts)
        n_pred, n_gt = sum(p_counts.values()), sum(g_counts.values())
        precision, recall = tp / n_pred, tp / n_gt
    else:  # "script"
        tp = sum(c for w, c in p_counts.items() if w in g_counts)
        fp = sum(c for w, c in p_counts.items() if w not in g_counts)
        fn = sum(c for w, c in g_counts.items() if w not in p_counts)
        precision, recall = tp / (tp + fp), tp / (tp + fn)
    if tp == 0:
        return 0.0, 0.0, 0.0
    return precision, recall, 2 * precision * recall / (precision + recall)


def token_recall(pred: TextOrTokens, gt: TextOrTokens, counting: str = "multiset") -> float:
    """tp / (tp + fn) over normalised tokens (0 if either side is empty)."""
    return token_prf(pred, gt, counting)[1]


def token_precision(pred: TextOrTokens, gt: TextOrTokens, counting: str = "multiset") -> float:
    """tp / (tp + fp) over normalised tokens (0 if either side is empty)."""
    return token_prf(pred, gt, counting)[0]


def token_f1(pred: TextOrTokens, gt: TextOrTokens, counting: str = "multiset") -> float:
    """Harmonic mean of token precision and recall (0 if either side is empty or no overlap)."""
    return token_prf(pred, gt, counting)[2]


# ----------------------------------------------------------------------------------------- BLEU


def _ngram_stats(hyp: list[str], ref: list[str], max_n: int) -> tuple[list[int], list[int]]:
    """Clipped n-gram matches and max(1, hypothesis n-gram count) for orders 1..max_n."""
    nums, dens = [], []
    for n in range(1, max_n + 1):
        hyp_counts = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        ref_counts = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        nums.append(sum(min(c, ref_counts[g]) for g, c in hyp_counts.items()))
        # nltk floors the denominator at 1 (hypothesis shorter than n).
        dens.append(max(1, sum(hyp_counts.values())))
    return nums, dens


def _brevity_penalty(ref_len: int, hyp_len: int) -> float:
    if hyp_len > ref_len:
        return 1.0
    if hyp_len == 0:
        return 0.0
    return math.exp(1 - ref_len / hyp_len)


def _bleu_from_stats(
    nums: Sequence[int], dens: Sequence[int], hyp_len: int, ref_len: int, weights: Sequence[float]
) -> float:
    # nltk returns exactly 0 only when there is no unigram match at all.
    if nums[0] == 0:
        return 0.0
    # nltk's method0 replaces a zero precision by sys.float_info.min, so a missing higher order
    # gives a tiny positive score (about 1e-77 for BLEU-4), not 0. Reproduced for exact equality.
    logs = []
    for w, num, den in zip(weights, nums, dens, strict=True):
        p = num / den if num else sys.float_info.min
        logs.append(w * math.log(p))
    return _brevity_penalty(ref_len, hyp_len) * math.exp(math.fsum(logs))


def _weights(max_n: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    if weights is None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        return (1.0 / max_n,) * max_n
    if len(weights) == 0:
        raise ValueError("weights must not be empty")
    return tuple(weights)


def sentence_bleu(
    pred: TextOrTokens, gt: TextOrTokens, max_n: int = 4, weights: Sequence[float] | None = None
) -> float:
    """nltk ``sentence_bleu([gt_tokens], pred_tokens, weights)`` with no smoothing.

    ``weights`` defaults to uniform 1/max_n over orders 1..max_n; when given, its length sets
    the orders and ``max_n`` is unused (e.g. ``(0, 1, 0, 0)`` is the individual bigram score).
    """
    w = _weights(max_n, weights)
    hyp, ref = _toks(pred), _toks(gt)
    nums, dens = _ngram_stats(hyp, ref, len(w))
    return _bleu_from_stats(nums, dens, len(hyp), len(ref), w)


def cumulative_bleu(pred: TextOrTokens, gt: TextOrTokens, max_n: int = 4) -> list[float]:
    """[BLEU-1, ..., BLEU-max_n], BLEU-n = nltk sentence BLEU with weights 1/n over orders 1..n."""
    hyp, ref = _toks(pred), _toks(gt)
    nums, dens = _ngram_stats(hyp, ref, max_n)
    return [_bleu_from_stats(nums[:n], dens[:n], len(hyp), len(ref), (1.0 / n,) * n) for n in range(1, max_n + 1)]


def corpus_bleu(
    preds: Sequence[TextOrTokens], gts: Sequence[TextOrTokens], max_n: int = 4, weights: Sequence[float] | None = None
) -> float:
    """nltk ``corpus_bleu`` (one reference per hypothesis, no smoothing): statistics summed first."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} references")
    w = _weights(max_n, weights)
    nums, dens = [0] * len(w), [0] * len(w)
    hyp_len = ref_len = 0
    for pred, gt in zip(preds, gts, strict=True):
        hyp, ref = _toks(pred), _toks(gt)
        n_i, d_i = _ngram_stats(hyp, ref, len(w))
        nums = [a + b for a, b in zip(nums, n_i, strict=True)]
        dens = [a + b for a, b in zip(dens, d_i, strict=True)]
        hyp_len += len(hyp)
        ref_len += len(ref)
    if not preds:
        return 0.0
    return _bleu_from_stats(nums, dens, hyp_len, ref_len, w)


# -------------------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: TextOrTokens, gt: TextOrTokens) -> float:
    """rouge-score rougeL F-measure (LCS, no stemming) on normalised tokens; 0 if either is empty."""
    hyp, ref = _toks(pred), _toks(gt)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0
