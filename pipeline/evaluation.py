"""Generation-based evaluation: batched greedy decoding, pairing by id, every protocol, files, MLflow.

The one place the reported metrics are computed: the module's test step only collects predictions; they
are de-duplicated by id (DistributedSampler pads the last batches with repeated samples) and scored here.
MLflow gets one name per definition (:func:`tracked_metrics`): the headline numbers ``eval/closed_accuracy``,
``eval/open_recall``, ``eval/bleu1``, each paper's protocol where its definition differs (``eval/<metric>_<protocol>``,
:data:`PROTOCOL_METRICS`), task, grounding and region scores, and the majority baseline; counts are params
(``eval.n_expected`` ...). metrics.json and report.md keep every protocol's every score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.problems import Problem
from datamodules.records import Record
from lightningmodules.metrics.baselines import majority_predictions
from lightningmodules.metrics.grounding_summary import grounding_summary, region_vqa_summary
from lightningmodules.metrics.pairing import Pair, Reference, pair_by_id
from lightningmodules.metrics.report import evaluation_report, flat_metrics, format_report
from lightningmodules.vlm_module import VLMModule
from medcore.ids import dedupe_by_id
from pipeline.fingerprints import file_sha256
from pipeline.plots import draw_overlay
from pipeline.stages import evaluation_module
from pipeline.trainer_factory import build_trainer

log = logging.getLogger("medpipe")

HEADLINE = ("closed_accuracy", "open_recall", "bleu1")

# MLflow name (under eval/) -> (protocol, its key), one name per definition; the headline eval/closed_accuracy is
# the default protocol's exact match (MedPLIB's rule too), eval/open_recall its token recall and eval/bleu1 the mean
# per-answer cumulative BLEU-1 over every VQA answer on normalised tokens (Uni-Med's all.bleu_scores.bleu1)
PROTOCOL_METRICS: dict[str, tuple[str, str]] = {
    # closed accuracy under each released script's rule (lightningmodules/metrics/protocols.py)
    "closed_accuracy_llava_med": ("llava_med", "closed_accuracy"),  # yes/no + substring, every closed item
    "closed_accuracy_llava_med_ad758b6": ("llava_med_ad758b6", "closed_accuracy"),  # a yes/no miss leaves
    "closed_accuracy_med_moe": ("med_moe", "closed_accuracy"),  # lowercased substring
    "closed_accuracy_uni_med": ("uni_med", "closed_accuracy"),  # normalised substring
    # open recall as the scripts count it (LLaVA-Med's = MedPLIB's = LLaVA-Med ad758b6's)
    "open_recall_llava_med": ("llava_med", "open_recall"),
    "open_recall_med_moe": ("med_moe", "open_recall"),
    # BLEU-1 of the open answers: individual, no smoothing (LLaVA-Med, MedPLIB) / nltk method1 smoothing (Med-MoE)
    "open_bleu1_llava_med": ("llava_med", "open_bleu1_individual"),
    "open_bleu1_med_moe": ("med_moe", "open_bleu1_individual_method1"),
}


def is_count(key: str) -> bool:
    """Question / record counts (``count``, ``closed_count``, ``n_...``): params, not metric charts."""
    last = key.rsplit("/", 1)[-1]
    return last == "count" or last.endswith("_count") or last.startswith("n_")


def tracked_metrics(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """What an evaluation logs to MLflow from its flat metrics (``flat_metrics`` plus grounding and region):
    ``eval/<headline>``, ``eval/<metric>_<protocol>`` (:data:`PROTOCOL_METRICS`), ``eval/task/...``,
    ``eval/seg/...`` (every key, as notebook 04 reads them), ``eval/region/...`` and ``baseline/<headline>``;
    counts are left to :func:`tracked_counts`."""
    out = {f"eval/{k}": metrics[k] for k in HEADLINE if k in metrics}
    for name, (protocol, key) in PROTOCOL_METRICS.items():
        if f"protocol/{protocol}/{key}" in metrics:
            out[f"eval/{name}"] = metrics[f"protocol/{protocol}/{key}"]
    for key, value in metrics.items():
        if key.startswith("seg/") or (key.startswith(("task/", "region/")) and not is_count(key)):
            out[f"eval/{key}"] = value
    out.update({f"baseline/{k}": v for k, v in baseline.items()})
    return out


def tracked_counts(split: str, counts: dict[str, Any], metrics: dict[str, float]) -> dict[str, str]:
    """The evaluation's counts as MLflow params: ``eval.split``, ``eval.n_expected`` / ``n_scored`` / ``n_skipped``,
    the closed and open questions (``eval.closed_count``, ``eval.open_count``) and each task's / region's count."""
    params = {"eval.split": split, **{f"eval.{k}": str(counts[k]) for k in ("n_expected", "n_scored", "n_skipped")}}
    for key in ("closed_count", "open_count"):
        if f"protocol/default/{key}" in metrics:
            params[f"eval.{key}"] = str(int(metrics[f"protocol/default/{key}"]))
    for key, value in metrics.items():
        if key.startswith(("task/", "region/")) and is_count(key):
            params["eval." + key.replace("/", ".")] = str(int(value))
    return params


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]  # flat: headline numbers plus protocol/..., text/..., task/...
    baseline: dict[str, float]
    predictions_file: Path
    count: int  # records scored (n_scored)
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    n_expected: int = 0  # records in the split's files: scored + skipped (on_bad_record: skip)
    n_skipped: int = 0


def reference_of(record: Record) -> Reference:
    return Reference(
        id=record.id,
        answer=record.answer,
        answer_type=record.answer_type,
        task=record.task,
        modality=record.modality,
        dataset=record.dataset,
        question=record.question,
        # Uni-Med's REC scores in the original pixels: detection.json's [x, y, w, h] and the image's (W, H)
        extra={"box": record.box, "image_size": record.extra.get("image_size")} if record.box is not None else {},
    )


def llava_med_prediction(p: dict[str, Any], model_id: str) -> dict[str, Any]:
    """LLaVA-Med's prediction fields first (question_id, prompt, text, answer_id, model_id, metadata),
    then ours. ``answer_id`` is a stable hash instead of LLaVA-Med's random shortuuid."""
    answer_id = hashlib.sha1(f"{p['question_id']}\0{p['text']}".encode()).hexdigest()[:22]
    ours = {k: v for k, v in p.items() if k not in ("question_id", "prompt", "text")}
    return {
        "question_id": p["question_id"],
        "prompt": p["prompt"],
        "text": p["text"],
        "answer_id": answer_id,
        "model_id": model_id,
        "metadata": {},
        **ours,
    }


def score_records(texts_by_id: dict[str, str], records: list[Record], *, protocol_tasks: bool = True) -> dict[str, Any]:
    """The full report for predictions (by record id) against records; ``protocol_tasks=False`` leaves out
    the papers' per-task scorers (Uni-Med's report generation runs Java)."""
    pairs: list[Pair] = pair_by_id(texts_by_id, [reference_of(r) for r in records])
    return evaluation_report(pairs, protocol_tasks=protocol_tasks)


def grounding_settings(cfg: DictConfig) -> dict[str, Any]:
    """How a grounded model's masks were scored, for metrics.json: the threshold and what an answer without
    ``<SEG>`` got (``evaluation.no_seg_mask``); empty for other models."""
    if cfg.model.get("grounding") is None:
        return {}
    return {
        "grounding": {
            "mask_threshold": cfg.evaluation.mask_threshold,
            "no_seg_mask": cfg.evaluation.no_seg_mask,
        }
    }


def split_counts(split: str, n_scored: int, skipped: list[Problem]) -> dict[str, Any]:
    """How much of the split the metrics cover: ``n_expected`` records in its files (before skips), ``n_scored``,
    ``n_skipped`` (``on_bad_record: skip``) and the skips by kind."""
    return {
        "n_expected": n_scored + len(skipped),
        "n_scored": n_scored,
        "n_skipped": len(skipped),
        "skipped": dict(sorted(Counter(p.kind for p in skipped).items())),
    }


def scored_by_metric(report: dict[str, Any]) -> dict[str, int]:
    """The records behind each headline metric: closed questions, open questions, all VQA answers."""
    default = report.get("protocols", {}).get("default", {})
    counts = {"closed_accuracy": default.get("closed_count"), "open_recall": default.get("open_count")}
    counts["bleu1"] = report.get("text", {}).get("count")
    return {k: int(v) for k, v in counts.items() if v is not None}


def counts_line(split: str, counts: dict[str, Any]) -> str:
    """report.md's line under its title: the split's records expected, scored and skipped (by kind)."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in counts["skipped"].items())
    return (
        f"Split `{split}`: {counts['n_expected']} records expected, {counts['n_scored']} scored, "
        f"{counts['n_skipped']} skipped{f' ({kinds}; listed in MLflow data/skipped_{split}.json)' if kinds else ''}."
    )


def provenance(cfg: DictConfig, source: str | Path | None, split: str, dm: Any) -> dict[str, Any]:
    """What produced the numbers of one evaluation: the weights (``source``: a hand-over file, with its SHA-256;
    ``model.init``'s checkpoint; or a stage's weights in the run), the config, the split of each dataset as
    released, and the released script each protocol follows (``PROTOCOL_SOURCES``)."""
    from lightningmodules.metrics.protocols import PROTOCOL_SOURCES

    weights: dict[str, Any] = {"source": str(source) if source is not None else None}
    if source is not None and Path(source).is_file():
        weights["sha256"] = file_sha256(Path(source))
        weights["bytes"] = Path(source).stat().st_size
    init = cfg.model.get("init")
    if init is not None:
        weights["model_init"] = {"format": init.format, "path": str(init.path)}
    return {
        "weights": weights,
        "config": cfg.name,
        "split": split,
        "datasets": {
            name: {"format": spec.format, "path": str(spec.path), "release_split": dm.release_split(spec, split)}
            for name, spec in dm.datasets.items()
        },
        "protocols": {name: source.where for name, source in PROTOCOL_SOURCES.items()},
    }


def evaluate_model(
    cfg: DictConfig,
    built: Any,
    *,
    tracker: Any,
    run_id: str | None,
    out_dir: Path,
    module: VLMModule | None = None,
    source: str | Path | None = None,
) -> EvalResult:
    """Generate answers for ``cfg.evaluation.split`` and score them (and the majority baseline).

    ``module`` is the stage's module when evaluating right after training (same run, same hparams); ``source``
    names the weights evaluated, recorded with the split and protocols in metrics.json (:func:`provenance`).
    """
    from pipeline.runner import build_datamodule, connect, log_split_skips

    split = cfg.evaluation.split
    eval_sets = list(cfg.evaluation.datasets) if cfg.evaluation.datasets else None
    dm = connect(build_datamodule(cfg, eval_sets), built)
    dm.prepare_data()
    if module is None:
        module = evaluation_module(cfg, built)
    records = dm.split_records(split)  # first: the split's skips are told apart from the baseline's train split
    trainer_cfg = cfg.trainer
    if trainer_cfg.strategy == "fsdp2":
        # generation is not sharded: ranks stop decoding after different numbers of steps, and FSDP2 gathers
        # weights in every forward, so each rank holds the whole model (DDP) for its share of the questions
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"strategy": "ddp"})
    trainer = build_trainer(trainer_cfg, logger=tracker.lightning_logger(run_id), root_dir=out_dir)
    trainer.test(module, dataloaders=dm.generation_dataloader(split), verbose=False)
    if not trainer.is_global_zero:
        return EvalResult(split=split, metrics={}, baseline={}, predictions_file=out_dir / "predictions.jsonl", count=0)

    predictions = dedupe_by_id(module.predictions)  # DistributedSampler padding repeats samples
    padding = len(module.predictions) - len(predictions)
    report = score_records({p["question_id"]: p["text"] for p in predictions}, records)
    counts = split_counts(split, len(records), dm.split_problems.get(split, []))
    metrics = flat_metrics(report)
    metrics.update(grounding_summary(predictions))  # seg/mdice, seg/miou per modality (grounded models)
    metrics.update(region_vqa_summary(predictions))  # region/...: MeCoVQA-Region under MedPLIB's protocol
    baseline_texts = majority_predictions(dm.split_records("train"), records)
    baseline_texts_by_id = {r.id: t for r, t in zip(records, baseline_texts, strict=True)}
    # the baseline's headline figures only: no per-task paper scorers (Java) a second time
    baseline_report = score_records(baseline_texts_by_id, records, protocol_tasks=False)
    baseline = {k: v for k, v in flat_metrics(baseline_report).items() if k in HEADLINE}

    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_file = out_dir / "predictions.jsonl"
    with open(predictions_file, "w") as f:
        f.writelines(json.dumps(llava_med_prediction(p, cfg.name)) + "\n" for p in predictions)
    summary = {
        "split": split,
        **counts,
        "padding_duplicates_removed": padding,
        "metrics": {k: metrics[k] for k in HEADLINE if k in metrics},
        "n_scored_by_metric": scored_by_metric(report),
        "majority_baseline": baseline,
        **grounding_settings(cfg),
        "provenance": provenance(cfg, source, split, dm),
        "all_metrics": metrics,
        "report": report,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    title, body = format_report(report).split("\n", 1)
    (out_dir / "report.md").write_text(f"{title}\n\n{counts_line(split, counts)}\n{body}")
    log_split_skips(tracker, run_id, dm)  # params data.<split>.skipped..., the baseline's train split too
    tracker.log_metrics(run_id, tracked_metrics(metrics, baseline))
    tracker.log_params(run_id, tracked_counts(split, counts, metrics))
    if tracker.enabled and run_id is not None:  # the evaluated datasets as inputs of the run, context: the split
        from pipeline.fingerprints import dataset_fingerprints
        from pipeline.mlflow_inputs import dataset_inputs

        fingerprints = dataset_fingerprints(dm)
        tested = {name: [split] for name, fp in fingerprints.items() if fp["records"].get(split)}
        tracker.log_datasets(run_id, dataset_inputs(fingerprints, tested))
    for name in ("predictions.jsonl", "metrics.json", "report.md"):
        tracker.log_file(run_id, out_dir / name, "evaluation")
    for sample in module.overlay_samples:  # grounded models: predicted / target masks of the first samples
        overlay = draw_overlay(sample.record, sample.pred, sample.target, out_dir / "overlays")
        tracker.log_file(run_id, overlay, "evaluation/overlays")
    by_id = {r.id: r for r in records}
    tracker.log_table(
        run_id,
        [
            {
                "question_id": p["question_id"],
                "question": p["prompt"],
                "prediction": p["text"],
                "answer": by_id[p["question_id"]].answer,
                "answer_type": p["answer_type"],
                "modality": p["modality"] or "",
                "dataset": p["dataset"],
            }
            for p in predictions
        ],
        "evaluation/predictions_table.json",
    )
    log.info(
        "evaluation on %s (%d questions scored of %d, %d skipped): %s | majority baseline: %s",
        split,
        counts["n_scored"],
        counts["n_expected"],
        counts["n_skipped"],
        ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE if k in metrics),
        ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()),
    )
    return EvalResult(
        split=split,
        metrics=metrics,
        baseline=baseline,
        predictions_file=predictions_file,
        count=counts["n_scored"],
        report=report,
        n_expected=counts["n_expected"],
        n_skipped=counts["n_skipped"],
    )
