"""The Stage protocol: everything that differs between stage kinds, decided in one object.

A stage decides, once, what it does to the freshly built (and restored) model (``prepare``: structural
changes and LoRA adapters), which parameters train (``set_trainable``: the trainable groups, MoE routers
included), which LightningModule runs it (``module``), which callbacks and artifacts it adds
(``callbacks``, ``log_artifacts``) and whether it is evaluated (``evaluated``). The runner
(``pipeline/runner.py``) is a loop over stages that owns the run state (resume, MLflow runs, hand-overs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.structure import apply_entry, apply_structure, stage_structure, structure_after
from pipeline.trainable import add_lora, set_trainable

log = logging.getLogger("medpipe")


class Stage:
    """One entry of the experiment's ``stages``; subclasses: ``VLMStage``, ``GroundingStage``, ``RouterStage``."""

    evaluated = True  # generation-based evaluation after the stage (evaluation.after_each_stage)

    def __init__(self, cfg: DictConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.config = cfg.stages[name]

    # -- model -----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, handovers: dict[str, Path]) -> None:
        """This stage's structure entries (``stage_structure``: modality classifier, MoE layers; recorded in
        the model so hand-overs rebuild them), then its LoRA adapters; ``handovers``: earlier stage -> file."""
        for recorded in self.apply_changes(model, **self.structure_weights(handovers)):
            log.info("stage %s: structure %s", self.name, recorded)

    def start_structure(self, model: nn.Module) -> None:
        """Shapes of the structure this stage starts from (the entries of the stages before it), for a model
        built without a hand-over (pre-flight, ``medpipe memory``)."""
        entries = structure_after(self.cfg, self.name)
        own = len(stage_structure(self.cfg, self.name))
        apply_structure(model, entries[: len(entries) - own], source=f"stages.{self.name} (the model it starts from)")

    def apply_changes(self, model: nn.Module, **weights: Any) -> list[dict[str, Any]]:
        """This stage's structure entries, applied with ``weights`` (``apply_entry``'s ``router_init``,
        ``sources``; none: shapes only, as the pre-flight check does), then its LoRA adapters; returns the
        recorded entries."""
        recorded = [apply_entry(model, entry, **weights) for entry in stage_structure(self.cfg, self.name)]
        if self.config.lora is not None:
            add_lora(model, self.config.lora)
        return recorded

    def structure_weights(self, handovers: dict[str, Path]) -> dict[str, Any]:
        """Hook: what the entries are applied with beyond their shapes (``apply_entry``'s ``router_init``,
        ``sources``); none by default."""
        return {}

    def trained_groups(self) -> list[str]:
        """Parameter groups that train (the YAML's ``train`` list, plus what the stage adds)."""
        return list(self.config.train)

    def frozen_groups(self) -> list[str]:
        """Parameter groups kept frozen even when a trained group contains them."""
        return []

    def set_trainable(self, model: nn.Module) -> dict[str, int]:
        """Train exactly this stage's groups; returns trainable parameter counts per group."""
        return set_trainable(model, self.trained_groups(), frozen=self.frozen_groups())

    # -- training --------------------------------------------------------------------------------
    def run_config(self) -> DictConfig:
        """The experiment config this stage trains under: ``data.batch_size``, ``data.max_length`` and
        ``trainer.accumulate_grad_batches`` replaced by the stage's own where it sets them."""
        overrides: dict[str, Any] = {}
        for section, key in (("data", "batch_size"), ("data", "max_length"), ("trainer", "accumulate_grad_batches")):
            if self.config.get(key) is not None:
                overrides.setdefault(section, {})[key] = self.config[key]
        if not overrides:
            return self.cfg
        merged = OmegaConf.merge(self.cfg, overrides)
        OmegaConf.set_readonly(merged, True)
        return merged

    def optim_settings(self) -> dict[str, Any]:
        """The LightningModule's optimiser keyword arguments (``lightningmodules/optimization.py``)."""
        optim = self.config.optim
        return {
            "lr": optim.lr,
            "weight_decay": optim.weight_decay,
            "betas": tuple(optim.betas),
            "warmup_ratio": optim.warmup_ratio,
            "scheduler": optim.scheduler,
            "min_lr_ratio": optim.min_lr_ratio,
            "warmup_steps": optim.warmup_steps,
            "warmup_start_ratio": optim.warmup_start_ratio,
            "decay_from": optim.decay_from,
        }

    def module(self, built: Any) -> L.LightningModule:
        """The LightningModule that trains this stage on ``built`` (a ``BuiltModel``)."""
        raise NotImplementedError

    def callbacks(self, module: L.LightningModule, *, tracker: Any, run_id: str | None) -> list[L.Callback]:
        """Callbacks this stage adds to the runner's (loss history, checkpoints): every stage logs its datasets as
        MLflow inputs of its run (``pipeline/mlflow_inputs.py``), with the "test" context of those its own
        evaluation reads in the same run."""
        from pipeline.mlflow_inputs import DatasetInputs

        evaluated = {"evaluated": self.evaluated_datasets(), "evaluated_split": self.cfg.evaluation.split}
        return [DatasetInputs(tracker=tracker, run_id=run_id, **evaluated)]

    def evaluated_datasets(self) -> list[str]:
        """Datasets whose ``evaluation.split`` this stage's evaluation reads in its run (``after_each_stage``)."""
        evaluation = self.cfg.evaluation
        if not (self.evaluated and evaluation.enabled and evaluation.after_each_stage):
            return []
        return list(evaluation.datasets) if evaluation.datasets else list(self.cfg.data.datasets)

    def log_artifacts(
        self, module: L.LightningModule, *, tracker: Any, run_id: str | None, out_dir: Path
    ) -> dict[str, Any]:
        """After training: this stage's artifacts (written to ``out_dir`` and MLflow); returns what was logged."""
        return {}
