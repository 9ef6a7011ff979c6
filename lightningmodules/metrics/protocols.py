"""VQA scoring protocols of the four papers: closed-question hit rule and open-question scores.

| protocol  | closed hit                                              | open scores                  |
|-----------|---------------------------------------------------------|------------------------------|
| default   | normalised exact match                                  | token recall                 |
| llava_med | ("yes" in p or "no" in p) and g in p, p/g normalised    | token recall                 |
| med_moe   | lowercased g substring of lowercased p                  | token recall                 |
| uni_med   | normalised g substring of normalised p                  | BLEU-1..4 (cumulative), F1   |
| medplib   | normalised exact match                                  | token recall, F1, BLEU-1..4  |

Deliberate differences from the released scripts (see the module tests):
- LLaVA-Med's run_eval.py appends nothing for a closed miss whose prediction contains yes/no,
  which drops those misses from the denominator; here every closed item counts.
- An empty ground truth never scores a closed hit ("" is a substring of everything).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from medcore.text import normalize_answer

from .text_scores import cumulative_bleu, token_prf

__all__ = ["PROTOCOLS", "answer_kind", "closed_hit", "open_scores", "score_protocol"]

PROTOCOLS: tuple[str, ...] = ("default", "llava_med", "med_moe", "uni_med", "medplib")

# Answer-type spellings found in the datasets and accepted by the papers' scripts.
_CLOSED_TYPES = frozenset({"closed", "close", "yes/no"})
_OPEN_TYPES = frozenset({"open", "other", "number"})


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _exact(pred: str, gt: str) -> bool:
    g = normalize_answer(gt)
    return g != "" and normalize_answer(pred) == g


def _llava_med(pred: str, gt: str) -> bool:
    # run_eval.py lowercases and then normalize_word()s both sides before these substring tests,
    # so "no" inside "abnormal" or "normal" counts as a yes/no answer.
    p, g = normalize_answer(pred.lower()), normalize_answer(gt.lower())
    return g != "" and ("yes" in p or "no" in p) and g in p


def _med_moe(pred: str, gt: str) -> bool:
    # Med-MoE run_eval.py: plain lowercase, no normalisation, substring.
    g = gt.lower()
    return g != "" and g in pred.lower()


def _uni_med(pred: str, gt: str) -> bool:
    g = normalize_answer(gt)
    return g != "" and g in normalize_answer(pred)


_CLOSED_RULES: dict[str, Callable[[str, str], bool]] = {
    "default": _exact,
    "llava_med": _llava_med,
    "med_moe": _med_moe,
    "uni_med": _uni_med,
    "medplib": _exact,
}


def closed_hit(protocol: str, pred: str, gt: str) -> bool:
    """Whether a closed-question prediction counts as correct under ``protocol``."""
    _check(protocol)
    return _CLOSED_RULES[protocol](_text(pred), _text(gt))


def open_scores(protocol: str, pred: str, gt: str, counting: str = "multiset") -> dict[str, float]:
    """Per-sample open-question scores of ``protocol`` (keys as in :func:`score_protocol`)."""
    _check(protocol)
    pred, gt = _text(pred), _text(gt)
    _, recall, f1 = token_prf(pred, gt, counting)
    if protocol in ("default", "llava_med", "med_moe"):
        return {"open_recall": recall}
    bleu = {f"bleu{n}": b for n, b in enumerate(cumulative_bleu(pred, gt, 4), start=1)}
    if protocol == "uni_med":
        return {"open_f1": f1, **bleu}
    return {"open_recall": recall, "open_f1": f1, **bleu}  # medplib


def answer_kind(answer_type: Any) -> str:
    """Map an answer-type label to 'closed' or 'open' (case-insensitive); ValueError otherwise."""
    kind = _text(answer_type).strip().lower()
    if kind in _CLOSED_TYPES:
        return "closed"
    if kind in _OPEN_TYPES:
        return "open"
    raise ValueError(
        f"answer_type {answer_type!r} is neither closed {sorted(_CLOSED_TYPES)} nor open {sorted(_OPEN_TYPES)}"
    )


def score_protocol(protocol: str, items: Iterable[Mapping[str, Any]], counting: str = "multiset") -> dict[str, float]:
    """Average the protocol's scores over ``items`` (dicts with ``pred``, ``gt``, ``answer_type``).

    Closed metrics are averaged over closed items and open metrics over open items only.
    ``closed_count`` and ``open_count`` are always present; a mean whose group is empty is left
    out rather than reported as 0. A missing prediction (``None``) scores 0.
    """
    _check(protocol)
    hits = 0
    n_closed = n_open = 0
    sums: dict[str, float] = {}
    for index, item in enumerate(items):
        try:
            pred, gt, answer_type = item["pred"], item["gt"], item["answer_type"]
        except KeyError as err:
            raise ValueError(f"item {index} lacks key {err.args[0]!r}") from None
        try:
            kind = answer_kind(answer_type)
        except ValueError as err:
            raise ValueError(f"item {index}: {err}") from None
        if kind == "closed":
            n_closed += 1
            hits += closed_hit(protocol, pred, gt)
        else:
            n_open += 1
            for key, value in open_scores(protocol, pred, gt, counting).items():
                sums[key] = sums.get(key, 0.0) + value
    out: dict[str, float] = {"closed_count": float(n_closed), "open_count": float(n_open)}
    if n_closed:
        out["closed_accuracy"] = hits / n_closed
    if n_open:
        out.update({key: total / n_open for key, total in sums.items()})
    return out
