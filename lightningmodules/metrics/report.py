"""The evaluation report: every paper's protocol side by side for the same predictions, task metrics,
and a breakdown by dataset x answer type x modality."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from .boxes import MissingGeometryError, grid_rec_scores
from .captioning import ScorerUnavailable
from .pairing import Pair
from .protocols import PROTOCOLS, answer_kind, closed_hit, score_protocol, task_scorers
from .segmentation import binarize, monai_dice, segmentation_scores
from .text_scores import corpus_bleu, cumulative_bleu, exact_match, rouge_l, token_f1, token_recall

VQA_TASKS = ("vqa", "qa", "region")  # answers scored as closed / open questions
HEADLINE = ("closed_accuracy", "open_recall")

log = logging.getLogger("medpipe")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def generation_scores(pairs: list[Pair]) -> dict[str, float]:
    """Free-text metrics: per-sample cumulative BLEU-1..4 (averaged, as the papers report), corpus
    BLEU-1..4, ROUGE-L, token F1 and exact match."""
    if not pairs:
        return {}
    preds = [p.prediction for p in pairs]
    gts = [p.reference.answer for p in pairs]
    per_sample = [cumulative_bleu(p, g, 4) for p, g in zip(preds, gts, strict=True)]
    out = {f"bleu{n}": _mean([s[n - 1] for s in per_sample]) for n in range(1, 5)}
    out.update({f"corpus_bleu{n}": corpus_bleu(preds, gts, max_n=n) for n in range(1, 5)})
    out["rouge_l"] = _mean([rouge_l(p, g) for p, g in zip(preds, gts, strict=True)])
    out["token_f1"] = _mean([token_f1(p, g) for p, g in zip(preds, gts, strict=True)])
    out["exact_match"] = _mean([exact_match(p, g) for p, g in zip(preds, gts, strict=True)])
    out["count"] = float(len(pairs))
    return out


def _task_scores(task: str, pairs: list[Pair]) -> dict[str, float]:
    if task == "refer":  # REC, medpipe's grid-vs-grid IoU (Uni-Med's pixel rule: uni_med/miou, uni_med/acc)
        return grid_rec_scores([p.prediction for p in pairs], [p.reference.answer for p in pairs])
    if task == "cls":
        return {
            "accuracy": _mean([exact_match(p.prediction, p.reference.answer) for p in pairs]),
            "count": float(len(pairs)),
        }
    return generation_scores(pairs)  # identify (REG), caption (report generation), anything else


def _task_item(p: Pair) -> dict[str, Any]:
    extra = p.reference.extra
    return {
        "id": p.reference.id,
        "pred": p.prediction,
        "gt": p.reference.answer,
        "box": extra.get("box"),  # ground truth in the original image's pixels, [x, y, w, h]
        "image_size": extra.get("image_size"),  # the original image's (W, H)
    }


def protocol_task_scores(by_task: dict[str, list[Pair]]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Each protocol's own scores of tasks beyond VQA (``protocols.task_scorers``: Uni-Med's REC and
    report generation), keyed ``<protocol>/<metric>`` per task, and one note per score left out because
    its inputs (a record's box or image size) or its tools (pycocoevalcap, Java) are missing."""
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    notes: list[str] = []
    for protocol in PROTOCOLS:
        for task, scorer in task_scorers(protocol).items():
            if task not in by_task:
                continue
            try:
                values = scorer([_task_item(p) for p in by_task[task]])
            except (MissingGeometryError, ScorerUnavailable) as err:
                notes.append(f"task {task}: {protocol} scores not computed: {err}")
                log.warning(notes[-1])
                continue
            scores[task].update({f"{protocol}/{k}": v for k, v in values.items()})
    return dict(scores), notes


def breakdown(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Rows of dataset x answer type x modality with the default protocol's headline numbers."""
    groups: dict[tuple[str, str, str], list[Pair]] = defaultdict(list)
    for p in pairs:
        key = (p.reference.dataset or "-", answer_kind(p.reference.answer_type), p.reference.modality or "-")
        groups[key].append(p)
    rows = []
    for (dataset, kind, modality), items in sorted(groups.items()):
        if kind == "closed":
            score = _mean([float(closed_hit("default", p.prediction, p.reference.answer)) for p in items])
        else:
            score = _mean([token_recall(p.prediction, p.reference.answer) for p in items])
        rows.append(
            {
                "dataset": dataset,
                "answer_type": kind,
                "modality": modality,
                "count": len(items),
                "metric": "closed_accuracy" if kind == "closed" else "open_recall",
                "score": score,
            }
        )
    return rows


def evaluation_report(pairs: list[Pair], *, protocol_tasks: bool = True) -> dict[str, Any]:
    """Everything the evaluation reports for one set of paired predictions. ``protocol_tasks=False``
    leaves out :func:`protocol_task_scores` (Uni-Med's report-generation set starts Java processes)."""
    vqa = [p for p in pairs if p.reference.task in VQA_TASKS]
    items = [{"pred": p.prediction, "gt": p.reference.answer, "answer_type": p.reference.answer_type} for p in vqa]
    report: dict[str, Any] = {"count": len(pairs), "protocols": {}, "tasks": {}, "breakdown": breakdown(vqa)}
    if vqa:
        report["protocols"] = {name: score_protocol(name, items) for name in PROTOCOLS}
        report["text"] = generation_scores(vqa)
    by_task: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        if p.reference.task not in VQA_TASKS:
            by_task[p.reference.task].append(p)
    report["tasks"] = {task: _task_scores(task, items) for task, items in sorted(by_task.items())}
    if protocol_tasks:
        extra_scores, notes = protocol_task_scores(by_task)
        for task, values in extra_scores.items():
            report["tasks"][task].update(values)
        if notes:
            report["notes"] = notes
    return report


def segmentation_report(
    logits: list[Any], gts: list[Any], modalities: list[str] | None = None, *, threshold: float = 0.1
) -> dict[str, float]:
    """MedPLIB's mDice / mIoU (per image at original resolution, also per modality) with MONAI's
    DiceMetric alongside. ``logits`` entries are (H, W) mask logits at the ground truth's resolution,
    or None where the model produced no mask (scores 0, counted as ``no_mask``)."""
    preds = [None if lg is None else binarize(lg, threshold) for lg in logits]
    out = segmentation_scores(preds, gts, modalities)
    out.update(monai_dice(preds, gts))
    out["no_mask"] = float(sum(p is None for p in preds))
    out["threshold"] = float(threshold)
    return out


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``protocol/<name>/<metric>``, ``text/<metric>``, ``task/<task>/<metric>`` plus the default
    protocol's headline numbers unprefixed, for MLflow."""
    out: dict[str, float] = {}
    for name, scores in report.get("protocols", {}).items():
        out.update({f"protocol/{name}/{k}": float(v) for k, v in scores.items()})
    out.update({f"text/{k}": float(v) for k, v in report.get("text", {}).items()})
    for task, scores in report.get("tasks", {}).items():
        out.update({f"task/{task}/{k}": float(v) for k, v in scores.items()})
    out.update({f"seg/{k}": float(v) for k, v in report.get("segmentation", {}).items()})
    default = report.get("protocols", {}).get("default", {})
    out.update({k: float(default[k]) for k in HEADLINE if k in default})
    if "text" in report:
        out["bleu1"] = float(report["text"]["bleu1"])
    return out


def format_report(report: dict[str, Any]) -> str:
    """Markdown: protocols side by side, task metrics, breakdown table."""
    lines = [f"# Evaluation report ({report['count']} predictions)", ""]
    protocols = report.get("protocols", {})
    if protocols:
        metrics = sorted(
            {k for scores in protocols.values() for k in scores}, key=lambda k: (not k.startswith("closed"), k)
        )
        lines += ["## Protocols", "", "| metric | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
        for metric in metrics:
            cells = [_cell(protocols[name].get(metric)) for name in protocols]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("text"):
        lines += ["## Free-text metrics (VQA answers)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in report["text"].items()]
        lines.append("")
    for task, scores in report.get("tasks", {}).items():
        lines += [f"## Task `{task}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in scores.items()]
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", "", *(f"- {note}" for note in report["notes"]), ""]
    if report.get("breakdown"):
        lines += [
            "## By dataset, answer type and modality (default protocol)",
            "",
            "| dataset | answer type | modality | count | metric | score |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['dataset']} | {r['answer_type']} | {r['modality']} | {r['count']} | {r['metric']} | "
            f"{_cell(r['score'])} |"
            for r in report["breakdown"]
        ]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer() and value > 1:
        return str(int(value))
    return f"{value:.4f}" if isinstance(value, float) else str(value)
