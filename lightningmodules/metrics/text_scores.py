"""Per-sample text scores on normalised tokens: exact match, token recall/precision/F1, BLEU, ROUGE-L.

Token recall / precision / F1 count as the papers' ``calculate_f1score`` does (``counting="script"``,
the default); the clipped-multiset counting is only there when asked for (``counting="clipped"``).
BLEU reproduces ``nltk.translate.bleu_score.sentence_bleu`` (nltk 3.10) number for number, without
smoothing or with ``SmoothingFunction().method1``, and ROUGE-L reproduces ``rouge_score``'s rougeL
F-measure, without importing either library.
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
    "individual_bleu",
    "rouge_l",
    "script_exact_match",
    "sentence_bleu",
    "token_f1",
    "token_precision",
    "token_prf",
    "token_recall",
]

TextOrTokens = str | Sequence[str]

COUNTING_MODES = ("script", "clipped")
SMOOTHING_MODES = (None, "method1")
METHOD1_EPSILON = 0.1  # nltk SmoothingFunction(epsilon=0.1).method1


def _toks(text: TextOrTokens | None) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return tokens(text)
    return list(text)


def exact_match(pred: str, gt: str) -> float:
    """1.0 when the normalised texts are identical, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gt))


def token_prf(pred: TextOrTokens, gt: TextOrTokens, counting: str = "script") -> tuple[float, float, float]:
    """(precision, recall, F1) of normalised whitespace tokens; all 0 if either side is empty or tp = 0.

    ``counting="script"`` (default): the papers' ``calculate_f1score`` (LLaVA-Med b9a98a7
    llava/eval/eval_metrics/evaluate_metrics.py:114-148; the same function in Med-MoE, MedPLIB and
    Uni-Med): for each distinct word, tp += its *prediction* count when the reference has it too,
    fp += its prediction count when the reference lacks it, fn += its reference count when the
    prediction lacks it. "left left lung" against "left lung nodule": tp 3, fp 0, fn 1.
    ``counting="clipped"``: tp = sum over words of min(count in pred, count in gt), precision
    tp / len(pred), recall tp / len(gt) (the same example: 2/3, 2/3); no paper counts this way.
    """
    if counting not in COUNTING_MODES:
        raise ValueError(f"counting must be one of {COUNTING_MODES}, got {counting!r}")
    p_counts, g_counts = Counter(_toks(pred)), Counter(_toks(gt))
    if not p_counts or not g_counts:
        return 0.0, 0.0, 0.0
    if counting == "clipped":
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


def token_recall(pred: TextOrTokens, gt: TextOrTokens, counting: str = "script") -> float:
    """tp / (tp + fn) over normalised tokens (0 if either side is empty)."""
    return token_prf(pred, gt, counting)[1]


def token_precision(pred: TextOrTokens, gt: TextOrTokens, counting: str = "script") -> float:
    """tp / (tp + fp) over normalised tokens (0 if either side is empty)."""
    return token_prf(pred, gt, counting)[0]


def token_f1(pred: TextOrTokens, gt: TextOrTokens, counting: str = "script") -> float:
    """Harmonic mean of token precision and recall (0 if either side is empty or no overlap)."""
    return token_prf(pred, gt, counting)[2]


def script_exact_match(pred: TextOrTokens, gt: TextOrTokens) -> float:
    """The scripts' ``calculate_exactmatch`` ("exact match score"; LLaVA-Med b9a98a7
    llava/eval/eval_metrics/evaluate_metrics.py:39-57): the number of *distinct* reference words found
    in the prediction divided by the prediction's word count (0 for an empty prediction). Not an
    exact match: "left lung lung" against "left lung" gives 2/3, "lung" against "left lung" 1.
    """
    p_counts, g_counts = Counter(_toks(pred)), Counter(_toks(gt))
    total = sum(p_counts.values())
    if total == 0:
        return 0.0
    return sum(1 for w in g_counts if w in p_counts) / total


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
    nums: Sequence[int],
    dens: Sequence[int],
    hyp_len: int,
    ref_len: int,
    weights: Sequence[float],
    smoothing: str | None = None,
) -> float:
    # nltk returns exactly 0 only when there is no unigram match at all, smoothing or not.
    if nums[0] == 0:
        return 0.0
    # nltk's method0 replaces a zero precision by sys.float_info.min, so a missing higher order
    # gives a tiny positive score (about 1e-77 for BLEU-4), not 0. Reproduced for exact equality.
    # method1 replaces it by (0 + epsilon) / (hypothesis n-gram count, at least 1).
    logs = []
    for w, num, den in zip(weights, nums, dens, strict=True):
        if num:
            p = num / den
        elif smoothing == "method1":
            p = (0 + METHOD1_EPSILON) / den
        else:
            p = sys.float_info.min
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


def _check_smoothing(smoothing: str | None) -> None:
    if smoothing not in SMOOTHING_MODES:
        raise ValueError(f"smoothing must be one of {SMOOTHING_MODES}, got {smoothing!r}")


def sentence_bleu(
    pred: TextOrTokens,
    gt: TextOrTokens,
    max_n: int = 4,
    weights: Sequence[float] | None = None,
    smoothing: str | None = None,
) -> float:
    """nltk ``sentence_bleu([gt_tokens], pred_tokens, weights, smoothing_function)``.

    ``weights`` defaults to uniform 1/max_n over orders 1..max_n; when given, its length sets
    the orders and ``max_n`` is unused (e.g. ``(0, 1, 0, 0)`` is the individual bigram score).
    ``smoothing``: None (nltk's default method0) or ``"method1"`` (``SmoothingFunction().method1``).
    """
    _check_smoothing(smoothing)
    w = _weights(max_n, weights)
    hyp, ref = _toks(pred), _toks(gt)
    nums, dens = _ngram_stats(hyp, ref, len(w))
    return _bleu_from_stats(nums, dens, len(hyp), len(ref), w, smoothing)


def individual_bleu(pred: TextOrTokens, gt: TextOrTokens, n: int, smoothing: str | None = None) -> float:
    """The individual n-gram score: nltk sentence BLEU with the one-hot weights the scripts pass,
    ``(1, 0, 0, 0)``, ``(0, 1, 0, 0)``, ``(0, 0, 1, 0)``, ``(0, 0, 0, 1)`` for n = 1..4 (brevity
    penalty times the n-gram precision, 0 when no unigram matches)."""
    if not 1 <= n <= 4:
        raise ValueError(f"n must be 1..4, got {n}")
    weights = tuple(1.0 if order == n else 0.0 for order in range(1, 5))
    return sentence_bleu(pred, gt, weights=weights, smoothing=smoothing)


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
