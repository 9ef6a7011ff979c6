"""A stage's ``moe:`` block (Med-MoE stage 3, MedPLIB stage IV): the selected decoder FFNs become MoE layers.

E copies of the dense FFN, or with ``moe.sources`` the FFNs of earlier stages' LLMs (MedPLIB stage IV);
routers initialised from a router stage's classifier (``router_init: modality_classifier``) and frozen
unless ``router_trainable``. The change is recorded in the model's structure, so the hand-over rebuilds
it (the entry comes from ``pipeline.structure.stage_structure``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.stages.kinds import router_stage_of

log = logging.getLogger("medpipe")


def classifier_from_handover(path: Path) -> nn.Linear:
    """The ``modality_classifier.linear`` of a router stage's hand-over as a Linear(D, C)."""
    from pipeline.handover import load_handover

    state = load_handover(path, prefix="modality_classifier.")["state_dict"]  # not the LLM a stage 2 trained
    weight, bias = state.get("modality_classifier.linear.weight"), state.get("modality_classifier.linear.bias")
    if weight is None:
        raise ValueError(f"{path}: no modality classifier in this hand-over (is it a kind: router stage's?)")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def source_llms(cfg: DictConfig, sources: list[str], handovers: dict[str, Path]) -> list[nn.Module]:
    """The LLM of each source stage, rebuilt from the config and its hand-over (LoRA already merged)."""
    from pipeline.handover import base_of, restore
    from pipeline.model_factory import build_model

    llms = []
    for source in sources:
        if source not in handovers:
            raise ValueError(f"moe.sources: stage {source!r} has no hand-over yet (it must run earlier)")
        built = build_model(cfg.model, cache_dir=cfg.cache_dir)
        restore(built.model, handovers[source], base=base_of(cfg.model))
        llms.append(built.model.llm)
    return llms


def router_init_of(cfg: DictConfig, name: str, handovers: dict[str, Path]) -> nn.Linear | None:
    """The classifier copied into every router (``router_init: modality_classifier``), else None (random)."""
    if cfg.stages[name].moe.router_init != "modality_classifier":
        return None
    router_name = router_stage_of(cfg, name)
    if router_name not in handovers:
        raise ValueError(f"stages.{name}.moe.router_stage: stage {router_name!r} has no hand-over yet")
    return classifier_from_handover(handovers[router_name])


def moe_weights(cfg: DictConfig, name: str, handovers: dict[str, Path]) -> dict[str, Any]:
    """What stage ``name``'s MoE entry is applied with beyond its shapes: the router initialisation and the
    source LLMs whose FFNs become the experts (``pipeline.structure.apply_entry``)."""
    sources = list(cfg.stages[name].moe.sources or [])
    router_init = router_init_of(cfg, name, handovers)
    log.info(
        "stage %s: MoE experts %s, routers %s",
        name,
        f"from stages {sources}" if sources else "upcycled",
        "from the modality classifier" if router_init is not None else "random",
    )
    return {"router_init": router_init, "sources": source_llms(cfg, sources, handovers) if sources else None}
