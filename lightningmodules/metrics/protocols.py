"""VQA scoring protocols: each paper's released evaluation script, rule for rule.

``PROTOCOL_SOURCES`` is the one table of which released script (repository, commit, file) each
protocol follows, its rules with the script's line numbers, and the name the script prints for each
metric; ``medpipe score --help`` and the report header print it (``protocol_sources_markdown``).

| protocol          | closed hit                                          | other metrics                         |
|-------------------|-----------------------------------------------------|---------------------------------------|
| default           | normalised exact match (medpipe's own)              | open recall                           |
| llava_med         | ("yes" in p or "no" in p) and g in p, normalised    | open recall / precision / F1, script  |
|                   | (b9a98a7: every closed item counts)                 | exact match, BLEU-4 cumulative and    |
|                   |                                                     | BLEU-1/2/3 individual                 |
| llava_med_ad758b6 | as llava_med, but a miss whose prediction contains  | as llava_med                          |
|                   | yes/no leaves the denominator (first release)       |                                       |
| med_moe           | lowercased g substring of lowercased p              | open recall / precision / F1, script  |
|                   |                                                     | exact match, BLEU-1/2/3 individual    |
|                   |                                                     | with method1 smoothing; closed F1 ... |
| uni_med           | normalised g substring of normalised p              | BLEU-1..4 cumulative and F1 for open, |
|                   |                                                     | closed and all questions              |
| medplib           | normalised g == normalised p                        | as llava_med                          |

Keys: ``closed_count`` / ``open_count`` (items of each kind), ``closed_accuracy``, and one key per
metric, prefixed by the questions it averages over (``open_``, ``closed_``, ``all_``). Recall,
precision and F1 count as the scripts' ``calculate_f1score`` (``text_scores.token_prf``); with
``counting="clipped"`` those keys carry a ``_clipped`` suffix. BLEU keys say the variant:
``bleu4_cumulative`` (weights 1/4 over orders 1..4), ``bleu2_individual`` (weights (0, 1, 0, 0)),
``..._method1`` (nltk's SmoothingFunction().method1); no suffix on smoothing means none.

Deliberate differences from the released scripts (see the module tests):
- An empty ground truth never scores a closed hit ("" is a substring of everything).
- Items are paired by id and their answer types read by ``answer_kind`` (the scripts zip by position
  and each accepts its own spellings of the answer type).
- LLaVA-Med's and MedPLIB's "open accuracy" is not computed: it needs a candidate answer list, and
  MedPLIB builds it as a Python set whose order (hash-seeded) breaks its argmax ties.
- Scores are fractions in [0, 1]; the scripts print percentages.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from medcore.text import normalize_answer

from .text_scores import cumulative_bleu, individual_bleu, script_exact_match, sentence_bleu, token_prf

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_SOURCES",
    "ProtocolSource",
    "answer_kind",
    "closed_hit",
    "closed_outcome",
    "item_scores",
    "metric_label",
    "open_scores",
    "protocol_sources_markdown",
    "protocol_sources_text",
    "score_protocol",
    "task_scorers",
]


@dataclass(frozen=True)
class ProtocolSource:
    """Which released script a protocol follows, and how that script names each metric."""

    repo: str  # GitHub owner/name, or "medpipe" for the project's own protocol
    commit: str
    path: str  # the evaluation script
    closed_rule: str  # the closed-question rule, with file:line
    other_rules: str  # the remaining metrics, with file:line
    labels: tuple[tuple[str, str], ...]  # (our key, the name the script prints), in the script's order

    @property
    def where(self) -> str:
        return self.path if self.repo == "medpipe" else f"github.com/{self.repo} @ {self.commit}, {self.path}"


_LLAVA_MED_OTHER = (
    "open: calculate_f1score and calculate_exactmatch on the normalised texts, which normalise again "
    "(run_eval.py:60-68, eval_metrics/evaluate_metrics.py:39-57 and 114-148); BLEU: nltk sentence_bleu "
    "on the normalised whitespace tokens, default weights (4-gram cumulative) and (1,0,0,0), (0,1,0,0), "
    "(0,0,1,0), no smoothing (run_eval.py:73-80)"
)


def _llava_med_labels(exact_match: str) -> tuple[tuple[str, str], ...]:
    return (
        ("open_script_exact_match", exact_match),
        ("open_f1", "f1 score"),
        ("open_precision", "precision"),
        ("open_recall", "recall"),
        ("open_bleu4_cumulative", "bleu_score"),
        ("open_bleu1_individual", "bleu_score_1"),
        ("open_bleu2_individual", "bleu_score_2"),
        ("open_bleu3_individual", "bleu_score_3"),
        ("closed_accuracy", "yes/no accuracy"),
    )


def _uni_med_labels() -> tuple[tuple[str, str], ...]:
    labels = [("closed_accuracy", "closed.acc_score")]
    for group in ("open", "closed", "all"):
        labels += [(f"{group}_bleu{n}_cumulative", f"{group}.bleu_scores.bleu{n}") for n in range(1, 5)]
        labels.append((f"{group}_f1", f"{group}.f1_score"))
    return tuple(labels)


PROTOCOL_SOURCES: dict[str, ProtocolSource] = {
    "default": ProtocolSource(
        repo="medpipe",
        commit="-",
        path="lightningmodules/metrics/protocols.py",
        closed_rule="normalised ground truth == normalised prediction",
        other_rules="open: token recall (calculate_f1score counting)",
        labels=(("closed_accuracy", "closed accuracy"), ("open_recall", "open recall")),
    ),
    "llava_med": ProtocolSource(
        repo="microsoft/LLaVA-Med",
        commit="b9a98a7",
        path="llava/eval/run_eval.py",
        closed_rule=(
            "lowercase + normalize_word both (run_eval.py:41-45); hit when ('yes' in p or 'no' in p) and "
            "g in p, as substrings; every other closed item a miss (run_eval.py:88-97, fix #35)"
        ),
        other_rules=_LLAVA_MED_OTHER,
        labels=_llava_med_labels("exact match score"),
    ),
    "llava_med_ad758b6": ProtocolSource(
        repo="microsoft/LLaVA-Med",
        commit="ad758b6",
        path="llava/eval/run_eval.py",
        closed_rule=(
            "as llava_med, but a miss whose prediction contains 'yes' or 'no' appends nothing and leaves "
            "the denominator (run_eval.py:91-93); 0 when no closed item is left (run_eval.py:109)"
        ),
        other_rules=_LLAVA_MED_OTHER,
        labels=_llava_med_labels("exact match score"),
    ),
    "med_moe": ProtocolSource(
        repo="jiangsongtao/Med-MoE",
        commit="148cbd6",
        path="run_eval.py",
        closed_rule=(
            "lowercased ground truth a substring of the lowercased prediction, no normalisation "
            "(run_eval.py:35-36, 58-61)"
        ),
        other_rules=(
            "open and closed: calculate_f1score on the lowercased texts, normalised once inside "
            "(run_eval.py:40-43, 53-56; moellava/eval/eval_metrics/evaluate_metrics.py:114-148), open "
            "calculate_exactmatch (run_eval.py:39, evaluate_metrics.py:39-57); BLEU: nltk sentence_bleu on "
            "the lowercased, not normalised whitespace tokens, weights (1,0,0,0), (0,1,0,0), (0,0,1,0), "
            "SmoothingFunction().method1 (run_eval.py:45-50)"
        ),
        labels=(
            ("open_script_exact_match", "Exact Match Score"),
            ("open_f1", "F1 Score"),
            ("open_precision", "Precision"),
            ("open_recall", "Recall"),
            ("open_bleu1_individual_method1", "BLEU Score (Weight 1)"),
            ("open_bleu2_individual_method1", "BLEU Score (Weight 2)"),
            ("open_bleu3_individual_method1", "BLEU Score (Weight 3)"),
            ("closed_accuracy", "yes/no accuracy"),
            ("closed_f1", "Closed F1 Score"),
            ("closed_precision", "Closed Precision"),
            ("closed_recall", "Closed Recall"),
        ),
    ),
    "uni_med": ProtocolSource(
        repo="tsinghua-msiip/Uni-Med",
        commit="63b9dfb",
        path="eval_vqa.py",
        closed_rule="normalised ground truth a substring of the normalised prediction (eval_vqa.py:17-26)",
        other_rules=(
            "for open, closed and all questions: calculate_f1score (eval_vqa.py:55-98) and cumulative "
            "BLEU-1..4 (weights 1/n over orders 1..n) on the normalised tokens, no smoothing "
            "(eval_vqa.py:28-53), grouped as eval_vqa.py:110-137; tasks beyond VQA (task_scorers): REC "
            "eval_ref.py, report generation eval_caption.py"
        ),
        labels=_uni_med_labels(),
    ),
    "medplib": ProtocolSource(
        repo="ShawnHuang497/MedPLIB",
        commit="5ab54bc",
        path="model/eval/cal_metric.py",
        closed_rule="normalised ground truth == normalised prediction (cal_metric.py:61-66, 122-125)",
        other_rules=(
            "as llava_med: open calculate_exactmatch / calculate_f1score on the normalised texts, which "
            "normalise again (cal_metric.py:81-90, model/eval/evaluate_metrics.py:39-57 and 115-153); BLEU "
            "4-gram cumulative and (1,0,0,0), (0,1,0,0), (0,0,1,0) individual, no smoothing "
            "(cal_metric.py:95-102)"
        ),
        labels=_llava_med_labels("exact match acc score"),
    ),
}

PROTOCOLS: tuple[str, ...] = tuple(PROTOCOL_SOURCES)

# Answer-type spellings found in the datasets and accepted by the papers' scripts.
_CLOSED_TYPES = frozenset({"closed", "close", "yes/no"})
_OPEN_TYPES = frozenset({"open", "other", "number"})


def _check(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# ------------------------------------------------------------------------------------ closed rules
# Each returns True (hit), False (miss) or None (left out of the denominator).


def _exact(pred: str, gt: str) -> bool:
    g = normalize_answer(gt)
    return g != "" and normalize_answer(pred) == g


def _llava_med(pred: str, gt: str) -> bool:
    # run_eval.py lowercases and then normalize_word()s both sides before these substring tests,
    # so "no" inside "abnormal", "not" or "nodule" and "yes" inside "yesterday" count as yes/no.
    p, g = normalize_answer(pred.lower()), normalize_answer(gt.lower())
    return g != "" and ("yes" in p or "no" in p) and g in p


def _llava_med_ad758b6(pred: str, gt: str) -> bool | None:
    p, g = normalize_answer(pred.lower()), normalize_answer(gt.lower())
    if "yes" in p or "no" in p:
        return True if g != "" and g in p else None  # the first release appended nothing for this miss
    return False


def _med_moe(pred: str, gt: str) -> bool:
    # Med-MoE run_eval.py: plain lowercase, no normalisation, substring.
    g = gt.lower()
    return g != "" and g in pred.lower()


def _uni_med(pred: str, gt: str) -> bool:
    g = normalize_answer(gt)
    return g != "" and g in normalize_answer(pred)


_CLOSED_RULES: dict[str, Callable[[str, str], bool | None]] = {
    "default": _exact,
    "llava_med": _llava_med,
    "llava_med_ad758b6": _llava_med_ad758b6,
    "med_moe": _med_moe,
    "uni_med": _uni_med,
    "medplib": _exact,
}


def closed_outcome(protocol: str, pred: str, gt: str) -> bool | None:
    """A closed item under ``protocol``: True (hit), False (miss) or None (left out of the denominator,
    only ``llava_med_ad758b6``)."""
    _check(protocol)
    return _CLOSED_RULES[protocol](_text(pred), _text(gt))


def closed_hit(protocol: str, pred: str, gt: str) -> bool:
    """Whether a closed-question prediction counts as correct under ``protocol``."""
    return closed_outcome(protocol, pred, gt) is True


# --------------------------------------------------------------------------- recall / F1 / BLEU


def _prf(
    group: str, pred: list[str], gt: list[str], counting: str, names: tuple[str, ...] = ("recall", "precision", "f1")
) -> dict[str, float]:
    precision, recall, f1 = token_prf(pred, gt, counting)
    values = {"recall": recall, "precision": precision, "f1": f1}
    suffix = "_clipped" if counting == "clipped" else ""
    return {f"{group}_{name}{suffix}": values[name] for name in names}


def _llava_med_open(pred: str, gt: str, counting: str) -> dict[str, float]:
    # run_eval.py:41-45 (cal_metric.py:61-66): lowercase + normalize_word; calculate_f1score and
    # calculate_exactmatch normalise once more (it matters past 32 periods: normalize_word strips at
    # most 32 per call); BLEU splits the once-normalised texts.
    p_once, g_once = normalize_answer(pred.lower()), normalize_answer(gt.lower())
    p_twice, g_twice = normalize_answer(p_once).split(), normalize_answer(g_once).split()
    hyp, ref = p_once.split(), g_once.split()
    out = {"open_script_exact_match": script_exact_match(p_twice, g_twice)}
    out.update(_prf("open", p_twice, g_twice, counting))
    out["open_bleu4_cumulative"] = sentence_bleu(hyp, ref, weights=(0.25, 0.25, 0.25, 0.25))
    out.update({f"open_bleu{n}_individual": individual_bleu(hyp, ref, n) for n in (1, 2, 3)})
    return out


def _med_moe_scores(kind: str, pred: str, gt: str, counting: str) -> dict[str, float]:
    # run_eval.py:35-36: lowercase only; calculate_f1score / calculate_exactmatch normalise inside.
    p_low, g_low = pred.lower(), gt.lower()
    p_toks, g_toks = normalize_answer(p_low).split(), normalize_answer(g_low).split()
    if kind == "closed":
        return _prf("closed", p_toks, g_toks, counting)
    out = {"open_script_exact_match": script_exact_match(p_toks, g_toks)}
    out.update(_prf("open", p_toks, g_toks, counting))
    hyp, ref = p_low.split(), g_low.split()  # BLEU on the lowercased, not normalised words
    out.update(
        {f"open_bleu{n}_individual_method1": individual_bleu(hyp, ref, n, smoothing="method1") for n in (1, 2, 3)}
    )
    return out


def _uni_med_scores(kind: str, pred: str, gt: str, counting: str) -> dict[str, float]:
    p_toks, g_toks = normalize_answer(pred).split(), normalize_answer(gt).split()
    bleu = cumulative_bleu(p_toks, g_toks, 4)
    out: dict[str, float] = {}
    for group in (kind, "all"):
        out.update({f"{group}_bleu{n}_cumulative": b for n, b in enumerate(bleu, start=1)})
        out.update(_prf(group, p_toks, g_toks, counting, names=("f1",)))
    return out


def item_scores(protocol: str, kind: str, pred: str, gt: str, counting: str = "script") -> dict[str, float]:
    """Per-item scores of ``protocol`` other than the closed hit, for an item of ``kind`` ("open" or
    "closed"); keys as in :func:`score_protocol` (group-prefixed)."""
    _check(protocol)
    if kind not in ("open", "closed"):
        raise ValueError(f"kind must be 'open' or 'closed', got {kind!r}")
    pred, gt = _text(pred), _text(gt)
    if protocol == "uni_med":
        return _uni_med_scores(kind, pred, gt, counting)
    if protocol == "med_moe":
        return _med_moe_scores(kind, pred, gt, counting)
    if kind == "closed":
        return {}
    if protocol == "default":
        return _prf("open", normalize_answer(pred).split(), normalize_answer(gt).split(), counting, ("recall",))
    return _llava_med_open(pred, gt, counting)  # llava_med, llava_med_ad758b6, medplib


def open_scores(protocol: str, pred: str, gt: str, counting: str = "script") -> dict[str, float]:
    """Per-sample open-question scores of ``protocol`` (the ``open_`` keys of :func:`score_protocol`)."""
    return {k: v for k, v in item_scores(protocol, "open", pred, gt, counting).items() if k.startswith("open_")}


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


def score_protocol(protocol: str, items: Iterable[Mapping[str, Any]], counting: str = "script") -> dict[str, float]:
    """Average the protocol's scores over ``items`` (dicts with ``pred``, ``gt``, ``answer_type``).

    Each metric is averaged over the items of its prefix (``closed_``, ``open_``, ``all_``).
    ``closed_count`` and ``open_count`` are always present; a mean whose group is empty is left
    out rather than reported as 0. A missing prediction (``None``) scores 0. ``closed_accuracy`` is
    hits over the closed items counted (``llava_med_ad758b6`` leaves some out: ``closed_excluded``;
    0 when none is left, as its script). ``counting="clipped"`` replaces the scripts' recall /
    precision / F1 by the clipped-multiset ones, under ``..._clipped`` keys.
    """
    _check(protocol)
    hits = excluded = 0
    n_closed = n_open = 0
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
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
            outcome = closed_outcome(protocol, pred, gt)
            hits += outcome is True
            excluded += outcome is None
        else:
            n_open += 1
        for key, value in item_scores(protocol, kind, pred, gt, counting).items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    out: dict[str, float] = {"closed_count": float(n_closed), "open_count": float(n_open)}
    means = {key: total / counts[key] for key, total in sums.items()}
    if n_closed:
        if protocol == "llava_med_ad758b6":
            means["closed_excluded"] = float(excluded)
        counted = n_closed - excluded
        means["closed_accuracy"] = hits / counted if counted else 0.0
    order = ["closed_excluded", *(key for key, _ in PROTOCOL_SOURCES[protocol].labels)]
    out.update({key: means.pop(key) for key in order if key in means})
    out.update(means)  # ..._clipped keys
    return out


def task_scorers(protocol: str) -> dict[str, Callable[..., dict[str, float]]]:
    """The protocol's scorers of tasks beyond VQA, keyed by task; each takes item mappings (``id``,
    ``pred``, ``gt``, ``box``, ``image_size``). Uni-Med: REC (eval_ref.py, ``boxes.uni_med_rec_scores``)
    and report generation (eval_caption.py, ``captioning.uni_med_report_scores``)."""
    _check(protocol)
    if protocol != "uni_med":
        return {}
    from .boxes import uni_med_rec_scores
    from .captioning import uni_med_report_scores

    return {"refer": uni_med_rec_scores, "caption": uni_med_report_scores}


def metric_label(protocol: str, key: str) -> str | None:
    """The name the protocol's script prints for ``key`` (None for counts and clipped variants)."""
    _check(protocol)
    return dict(PROTOCOL_SOURCES[protocol].labels).get(key)


def protocol_sources_markdown(protocols: Iterable[str] | None = None) -> str:
    """Markdown: which released script each protocol follows, its rules, and the script's metric names."""
    names = list(PROTOCOLS if protocols is None else protocols)
    lines = ["| protocol | follows | closed rule | other metrics |", "|---|---|---|---|"]
    for name in names:
        s = PROTOCOL_SOURCES[name]
        lines.append(f"| {name} | {s.where} | {s.closed_rule} | {s.other_rules} |")
    lines += ["", "| protocol | metric | name in the script |", "|---|---|---|"]
    for name in names:
        lines += [f"| {name} | {key} | {label} |" for key, label in PROTOCOL_SOURCES[name].labels]
    return "\n".join(lines)


def protocol_sources_text(width: int = 100) -> str:
    """Plain text for ``--help``: one paragraph per protocol (the released script and its rules)."""
    lines = ["protocols and the released scripts they follow:"]
    for name, s in PROTOCOL_SOURCES.items():
        lines.append(f"  {name}: {s.where}")
        for head, text in (("closed", s.closed_rule), ("other", s.other_rules)):
            lines += textwrap.wrap(f"{head}: {text}", width, initial_indent="    ", subsequent_indent="      ")
    return "\n".join(lines)
