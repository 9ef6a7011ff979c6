"""Stage kinds: ``stage_for(cfg, name)`` is the object that decides what a stage prepares, trains, runs
with, logs and whether it is evaluated (``pipeline/stages/base.py``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.stages.kinds import ROUTER, VLM

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from pipeline.stages.base import Stage
    from pipeline.stages.router import RouterStage
    from pipeline.stages.vlm import GroundingStage, VLMStage

__all__ = ["GroundingStage", "RouterStage", "Stage", "VLMStage", "evaluation_module", "model_stage_class", "stage_for"]

# the stage classes import torch; config validation imports pipeline.stages.kinds, so load them on first use
_LAZY = {
    "Stage": "pipeline.stages.base",
    "RouterStage": "pipeline.stages.router",
    "VLMStage": "pipeline.stages.vlm",
    "GroundingStage": "pipeline.stages.vlm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.stages' has no attribute {name!r}")


def model_stage_class(cfg: DictConfig) -> type[VLMStage]:
    """The stage class that trains and evaluates this config's model: grounded (``model.grounding``) or not."""
    from pipeline.stages.vlm import GroundingStage, VLMStage

    return GroundingStage if cfg.model.get("grounding") is not None else VLMStage


def stage_for(cfg: DictConfig, name: str) -> Stage:
    """The stage object of ``cfg.stages[name]``, by its ``kind``."""
    from pipeline.stages.router import RouterStage

    classes: dict[str, type[Stage]] = {VLM: model_stage_class(cfg), ROUTER: RouterStage}
    kind = cfg.stages[name].kind
    if kind not in classes:
        raise ValueError(f"stages.{name}.kind: {kind!r} is not one of {sorted(classes)}")
    return classes[kind](cfg, name)


def evaluation_module(cfg: DictConfig, built: Any) -> Any:
    """The LightningModule that generates answers for an evaluation outside a stage (``medpipe evaluate``)."""
    return model_stage_class(cfg).evaluation_module(cfg, built)
