"""``medpipe params CONFIG``: total parameters and parameters active per token of an experiment's model.

The model is built by ``build_model(weights="none")`` on PyTorch's ``meta`` device (shapes from the
checkpoints' configs, or the built-in architectures when a path is absent; no weights read, no memory),
every structural entry up to ``stage`` (default: the last) is replayed (``structure_after``: router
classifier, MoE layers), and ``count_parameters`` counts it, grounding head included: everything outside
MoE layers is active, in each MoE layer the router, ``top_k`` of the E experts and the meta expert
(Med-MoE's headline is the active fraction).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

PARTS = ("vision", "aggregation", "connector", "llm", "modality_classifier", "grounding", "region")


def model_after_stage(cfg: DictConfig, stage: str | None = None, *, device: str = "meta") -> tuple[Any, str | None]:
    """``(BuiltModel without weights, stage name)``: the model as it is after ``stage`` (default: the last;
    None for an experiment without stages)."""
    from pipeline.model_factory import build_model
    from pipeline.structure import apply_structure, structure_after

    names = list(cfg.stages.keys())
    if stage is not None and stage not in names:
        raise ValueError(f"stage {stage!r} is not in the config (stages: {', '.join(names)})")
    stage = stage or (names[-1] if names else None)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device=device)
    if stage is not None:
        with torch.device(device):  # new experts / routers on meta too: no memory for a 4 x 2.7B-FFN model
            apply_structure(built.model, structure_after(cfg, stage), source=f"stage {stage}")
    return built, stage


def part_counts(model: nn.Module) -> dict[str, int]:
    parts = {}
    for name in PARTS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            parts[name] = sum(p.numel() for p in module.parameters())
    return parts


def experiment_params(cfg: DictConfig, *, stage: str | None = None) -> dict[str, Any]:
    """``{"total", "active_per_token", "active_fraction", ..., "parts", "stage", "device"}`` for the config."""
    from lightningmodules.models.moe import count_parameters

    built, stage = model_after_stage(cfg, stage)
    model = built.model
    counts = count_parameters(model)
    counts["embeddings"] = count_parameters(model.llm)["embeddings"]  # the LLM's input + output embeddings
    return {**counts, "parts": part_counts(model), "stage": stage, "device": "meta"}


def format_params(result: dict[str, Any]) -> str:
    lines = [
        f"model after stage {result['stage']} (built on {result['device']})",
        f"  total parameters        {result['total']:>16,}",
        f"  active per token        {result['active_per_token']:>16,}  ({100 * result['active_fraction']:.1f}%)",
    ]
    if result["moe_layers"]:
        lines.append(
            f"  MoE layers {result['moe_layers']}: experts {result['experts_total']:,} "
            f"(active {result['experts_active']:,}), meta experts {result['meta_experts']:,}, "
            f"routers {result['routers']:,}"
        )
    lines.append("  parts: " + ", ".join(f"{k} {v:,}" for k, v in result["parts"].items()))
    return "\n".join(lines)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result)
