"""Generation-based evaluation of a built model on the configured split, with files and MLflow."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightningmodules.metrics.baselines import majority_predictions
from lightningmodules.metrics.vqa_metrics import bleu1, closed_accuracy, open_recall
from lightningmodules.vlm_module import VLMModule
from pipeline.trainer_factory import build_trainer

log = logging.getLogger("medpipe")

METRICS = ("closed_accuracy", "open_recall", "bleu1")


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]
    baseline: dict[str, float]
    predictions_file: Path
    count: int
    seconds: float = 0.0
    predictions: list[dict[str, Any]] = field(default_factory=list)


def _score(texts: list[str], records: list[Any]) -> dict[str, float]:
    metrics = {"closed_accuracy": closed_accuracy(), "open_recall": open_recall(), "bleu1": bleu1()}
    answers = [r.answer for r in records]
    kinds = [r.answer_type for r in records]
    return {k: float(m(texts, answers, kinds)) for k, m in metrics.items()}


def evaluate_model(cfg: DictConfig, built: Any, *, tracker: Any, run_id: str | None, out_dir: Path,
                   module: VLMModule | None = None) -> EvalResult:
    """Generate answers for ``cfg.evaluation.split`` and score them (and the majority baseline).

    ``module`` is the stage's module when evaluating right after training (same run, same hparams).
    """
    from pipeline.runner import build_datamodule, connect

    split = cfg.evaluation.split
    eval_sets = list(cfg.evaluation.datasets) if cfg.evaluation.datasets else None
    dm = connect(build_datamodule(cfg, eval_sets), built)
    dm.prepare_data()
    if module is None:
        module = VLMModule(model=built.model, tokenizer=built.tokenizer,
                           max_new_tokens=cfg.evaluation.max_new_tokens)
    trainer = build_trainer(cfg.trainer, logger=tracker.lightning_logger(run_id), root_dir=out_dir)
    loader = dm._loader(split, train=False, generation=True)
    trainer.test(module, dataloaders=loader, verbose=False)
    metrics = {k: float(trainer.callback_metrics[f"test/{k}"]) for k in METRICS}

    records = dm.split_records(split)
    baseline_texts = majority_predictions(dm.split_records("train"), records)
    baseline = _score(baseline_texts, records)

    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_file = out_dir / "predictions.jsonl"
    with open(predictions_file, "w") as f:
        for p in module.predictions:
            f.write(json.dumps(p) + "\n")
    summary = {"split": split, "count": len(module.predictions), "metrics": metrics,
               "majority_baseline": baseline}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    tracker.log_metrics(run_id, {f"baseline/{k}": v for k, v in baseline.items()})
    tracker.log_file(run_id, predictions_file, "evaluation")
    tracker.log_file(run_id, out_dir / "metrics.json", "evaluation")
    log.info("evaluation on %s (%d questions): %s | majority baseline: %s", split, len(module.predictions),
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
             ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()))
    return EvalResult(split=split, metrics=metrics, baseline=baseline, predictions_file=predictions_file,
                      count=len(module.predictions), predictions=module.predictions)

