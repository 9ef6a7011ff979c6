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


def handover_sizes(cfg: DictConfig) -> list[dict[str, Any]]:
    """What each stage's hand-over holds, computed on the model built without weights on the meta device the
    way the runner computes it (``pipeline.handover.changed_keys``, LoRA adapters as factors): ``{"stage",
    "keys", "params", "bytes"}`` of the delta beside ``full_bytes`` (every weight, LoRA merged: the format-1
    ``handover.pt``). Trained weights count in float32 (the masters ``set_trainable`` keeps), the rest in their
    load dtype."""
    from pipeline.handover import changed_keys, trained_names
    from pipeline.model_factory import build_model, checkpoint_prefixes
    from pipeline.stages import stage_for
    from pipeline.trainable import merge_lora

    rows = []
    for index, name in enumerate(cfg.stages):
        stage = stage_for(cfg, name)
        model = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta").model
        with torch.device("meta"):
            stage.start_structure(model)
            start_keys = set(model.state_dict())
            if index == 0 and cfg.stages[name].init_from is None:  # the first also holds what no checkpoint has
                start_keys = {k for k in start_keys if k.startswith(checkpoint_prefixes(cfg.model))}
            stage.apply_changes(model)
        stage.set_trainable(model)
        keys = changed_keys(model, trained=trained_names(model), start_keys=start_keys)
        state = model.state_dict()
        delta = {
            "keys": len(keys),
            "params": sum(state[k].numel() for k in keys),
            "bytes": sum(state[k].numel() * state[k].element_size() for k in keys),
        }
        merge_lora(model)
        full = sum(v.numel() * v.element_size() for v in _unique_tensors(model.state_dict()))
        rows.append({"stage": name, **delta, "full_bytes": full})
    return rows


def _unique_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for value in state.values():
        if id(value) not in seen:
            seen.add(id(value))
            out.append(value)
    return out


def format_handover_sizes(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'stage':<20} {'delta keys':>10} {'delta params':>16} {'delta':>10} {'full model':>11}"]
    for row in rows:
        lines.append(
            f"{row['stage']:<20} {row['keys']:>10,} {row['params']:>16,} {row['bytes'] / 2**30:>8.2f} GB "
            f"{row['full_bytes'] / 2**30:>8.2f} GB"
        )
    return "\n".join(lines)
