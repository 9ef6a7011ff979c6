"""``kind: vlm`` stages: the multimodal model trains on its language-modelling loss (``VLMStage``), with the
mask losses of MedPLIB's grounded model (``GroundingStage``); either may carry an ``moe:`` block."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch import nn

from datamodules.specs import TASKS
from lightningmodules.grounding_module import GroundingVLMModule, grounding_module_settings
from lightningmodules.vlm_module import DECODING_DEFAULTS, VLMModule
from pipeline.callbacks import RoutingHeatmap
from pipeline.gradient_conflict import GradientConflict
from pipeline.stages.base import Stage
from pipeline.stages.moe import moe_weights

log = logging.getLogger("medpipe")


class VLMStage(Stage):
    """Trains ``VLMModule``; an ``moe:`` block converts decoder FFNs first (routers frozen unless
    ``moe.router_trainable``). Adds the CMoE routing heatmap, the gradient-conflict callback
    (``analysis.grad_conflict``) and, with MoE layers, the ``moe/expert_load.json`` artifact."""

    module_class: type[VLMModule] = VLMModule

    @property
    def moe(self) -> Any:
        return self.config.moe

    def structure_weights(self, handovers: dict[str, Path]) -> dict[str, Any]:
        return moe_weights(self.cfg, self.name, handovers) if self.moe is not None else {}

    def trained_groups(self) -> list[str]:
        groups = super().trained_groups()
        if self.moe is not None and self.moe.router_trainable and "moe_router" not in groups:
            groups.append("moe_router")  # trainable routers train whatever the `train` groups
        return groups

    def frozen_groups(self) -> list[str]:
        if self.moe is not None and not self.moe.router_trainable:
            return ["moe_router"]  # Med-MoE keeps the classifier-initialised routers fixed
        return []

    def set_trainable(self, model: nn.Module) -> dict[str, int]:
        counts = super().set_trainable(model)
        if self.frozen_groups():
            log.info("stage %s: MoE routers frozen (moe.router_trainable: false)", self.name)
        return counts

    @classmethod
    def module_settings(cls, cfg: DictConfig, stage: Any = None) -> dict[str, Any]:
        """Keyword arguments of ``module_class`` beyond the model, tokenizer and optimiser: the evaluation's
        length and decoding settings, and the run's seed for sampled decoding."""
        evaluation = cfg.evaluation
        decoding = {key: evaluation[key] for key in DECODING_DEFAULTS}
        return {"max_new_tokens": evaluation.max_new_tokens, **decoding, "generation_seed": cfg.seed}

    def module(self, built: Any) -> VLMModule:
        return self.module_class(
            model=built.model,
            tokenizer=built.tokenizer,
            task_names=list(TASKS),
            **self.optim_settings(),
            **self.module_settings(self.cfg, self.config),
        )

    @classmethod
    def evaluation_module(cls, cfg: DictConfig, built: Any) -> VLMModule:
        """The module that generates answers for ``medpipe evaluate`` (no stage trained before it)."""
        return cls.module_class(model=built.model, tokenizer=built.tokenizer, **cls.module_settings(cfg))

    def callbacks(self, module: L.LightningModule, *, tracker: Any, run_id: str | None) -> list[L.Callback]:
        out: list[L.Callback] = super().callbacks(module, tracker=tracker, run_id=run_id)
        if self.cfg.model.connector.type == "cmoe":  # the module logs per-task routing each validation
            out.append(
                RoutingHeatmap(tracker=tracker, run_id=run_id, task_names=list(TASKS), title=f"stage {self.name}")
            )
        conflict = self.cfg.analysis.grad_conflict
        if conflict.every_n_steps:
            out.append(
                GradientConflict(
                    every_n_steps=conflict.every_n_steps,
                    samples_per_task=conflict.samples_per_task,
                    groups=list(conflict.groups),
                    tracker=tracker,
                    run_id=run_id,
                )
            )
        return out

    def log_artifacts(self, module: VLMModule, *, tracker: Any, run_id: str | None, out_dir: Path) -> dict[str, Any]:
        """With MoE layers: tokens routed to each expert per layer and modality (``moe/expert_load.json``) and
        the layer x expert heatmap of the shares (``plots/moe_expert_load.png``, also in ``out_dir``)."""
        summary = module.expert_load()
        if summary is None:
            return {}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "expert_load.json").write_text(json.dumps(summary, indent=2))
        tracker.log_text(run_id, json.dumps(summary, indent=2), "moe/expert_load.json")
        tracker.log_metrics(run_id, {"moe/dropped_total": float(summary["dropped_total"])})
        import matplotlib.pyplot as plt

        from pipeline.plots import expert_load_heatmap

        figure = expert_load_heatmap(summary, title=f"stage {self.name}: token assignments per expert")
        figure.savefig(out_dir / "moe_expert_load.png")
        tracker.log_figure(run_id, figure, "plots/moe_expert_load.png")
        plt.close(figure)
        return {"expert_load": summary, "heatmap": out_dir / "moe_expert_load.png"}


class GroundingStage(VLMStage):
    """MedPLIB's grounded model (``model.grounding``): ``GroundingVLMModule`` with the stage's loss weights
    (``grounding_loss``, else ``model.grounding.loss``)."""

    module_class = GroundingVLMModule

    @classmethod
    def module_settings(cls, cfg: DictConfig, stage: Any = None) -> dict[str, Any]:
        return {**super().module_settings(cfg, stage), **grounding_module_settings(cfg, stage)}
