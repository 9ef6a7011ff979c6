"""Per-GPU memory of each training stage of an experiment, estimated without a GPU: ``medpipe memory``.

The recipes are the experiment YAMLs (``medpipe memory CONFIG``, or ``--recipe`` for the papers' shipped
files). For each stage the model is built the way the runner trains it, on PyTorch's ``meta`` device with
no weights (``build_model(weights="none")``: the checkpoints' configs, or the built-in architectures of
``pipeline/architectures.py`` when a path is absent): the structure it starts from and its own changes and
LoRA adapters applied by the stage itself (``Stage.start_structure`` / ``apply_changes``, as the pre-flight
check does), and its trainable groups set by the stage (``pipeline/stages``). Parameter counts are therefore
exact; the rest is the standard accounting:

- weights: every parameter in its storage dtype: under ``*-mixed`` the trainable ones in fp32 (master
  copies) and the frozen ones in their load dtype (``model.llm.dtype`` / ``model.vision.dtype``: bf16
  halves them; fsdp loads float32), under ``*-true`` bf16/fp16 all; gradients: trainable parameters,
  same dtype; AdamW state: two tensors per trainable parameter in the parameter dtype (fp32 under mixed
  precision);
- sharding: ``fsdp`` / ``deepspeed_stage_3`` divide weights, gradients and optimizer state by the
  number of GPUs, ``deepspeed_stage_2`` gradients and optimizer state, ``deepspeed_stage_1`` the
  optimizer state; ``ddp`` nothing;
- activations of the LLM per micro-batch (Korthikanti et al., 2022, 16-bit activations, memory-
  efficient attention so no s^2 score matrices): ``34 s b h`` bytes per layer, of which the FFN is
  ``19 s b h`` (scaled by k + meta in a stage with MoE layers); with gradient checkpointing ``2 s b h``
  per layer plus one full layer; the frozen vision tower and mask encoder keep no activations. The LM
  head runs only on answer tokens (``answer_tokens``), so logits cost ``b t V 4`` bytes, not ``b s V``.

The figure is a planning estimate: allocator fragmentation, CUDA context (~0.5-1 GB) and temporary
buffers come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

GB = 1024**3
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

# The papers' shipped recipes (``--recipe``): an experiment file and the overrides that pick the variant.
PAPER_RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "uni_med": ("uni_med/recipe.yaml", ()),
    "med_moe_phi2": ("med_moe/med_moe.yaml", ()),
    "med_moe_stablelm": ("med_moe/med_moe.yaml", ("model.llm.path=/models/stablelm-2-1_6b",)),
    "medplib": ("medplib/medplib.yaml", ()),
}

STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


@dataclass
class StageCounts:
    """What the estimate needs of a stage's model."""

    total: int  # every parameter of the model as the stage trains it (structure + LoRA)
    trainable: int  # the parameters the stage trains
    layers: int  # LLM decoder layers
    hidden: int  # LLM hidden size
    vocab: int  # LM head rows
    ffn_scale: int = 1  # FFN activations per token, in dense FFNs: top_k + meta expert with MoE layers
    parts: dict[str, int] = field(default_factory=dict)  # parameters per part (``pipeline.params.PARTS``)
    frozen_half: int = 0  # frozen parameters loaded in bf16 / fp16: 2 bytes even under mixed precision


def stage_counts(cfg: DictConfig, name: str) -> StageCounts:
    """The counts of stage ``name``'s model, built without weights on the meta device."""
    import torch

    from lightningmodules.models.moe import moe_layers
    from pipeline.model_factory import build_model
    from pipeline.params import part_counts
    from pipeline.stages import stage_for

    stage = stage_for(cfg, name)
    model = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta").model
    with torch.device("meta"):  # the stage's model as it trains, shapes only (as the pre-flight check builds it)
        stage.start_structure(model)
        stage.apply_changes(model)
    stage.set_trainable(model)
    moe = [layer for _, layer in moe_layers(model)]
    llm = model.llm
    return StageCounts(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=int(llm.config.num_hidden_layers),
        hidden=int(llm.config.hidden_size),
        vocab=int(llm.get_output_embeddings().weight.shape[0]),
        ffn_scale=moe[0].top_k + (moe[0].meta_expert is not None) if moe else 1,
        parts=part_counts(model),
        frozen_half=sum(p.numel() for p in model.parameters() if not p.requires_grad and p.element_size() == 2),
    )


def stage_memory(
    counts: StageCounts,
    *,
    devices: int = 8,
    strategy: str = "ddp",
    precision: str = "bf16-mixed",
    micro_batch: int = 4,
    seq_len: int = 2048,
    answer_tokens: int = 256,
    gradient_checkpointing: bool = False,
) -> dict[str, float]:
    """Bytes per GPU (in GB) for one stage: weights, gradients, optimizer state, activations."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    mixed = precision.endswith("mixed") or precision.startswith("32")
    param_bytes = 4 if mixed else 2
    shard_weights = devices if strategy in ("fsdp", "deepspeed_stage_3") else 1
    shard_grads = devices if strategy in ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3") else 1
    shard_optim = devices if strategy != "ddp" else 1
    half = 0 if strategy == "fsdp" else counts.frozen_half  # fsdp loads float32 (config validation)
    weights = ((counts.total - half) * param_bytes + half * 2) / shard_weights
    grads = counts.trainable * param_bytes / shard_grads
    optim = counts.trainable * 2 * param_bytes / shard_optim

    sbh = seq_len * micro_batch * counts.hidden
    per_layer = (34 - 19) * sbh + 19 * sbh * counts.ffn_scale
    if gradient_checkpointing:
        activations = 2 * sbh * counts.layers + per_layer
    else:
        activations = per_layer * counts.layers
    logits = micro_batch * answer_tokens * counts.vocab * 4
    out = {
        "params_total": counts.total / 1e9,
        "params_trainable": counts.trainable / 1e9,
        "weights_gb": weights / GB,
        "gradients_gb": grads / GB,
        "optimizer_gb": optim / GB,
        "activations_gb": (activations + logits) / GB,
    }
    out["total_gb"] = out["weights_gb"] + out["gradients_gb"] + out["optimizer_gb"] + out["activations_gb"]
    return out


def experiment_memory(cfg: DictConfig, **kwargs: Any) -> dict[str, dict[str, float]]:
    """Stage name -> :func:`stage_memory` figures, for every stage of the experiment."""
    return {name: stage_memory(stage_counts(cfg, name), **kwargs) for name in cfg.stages}


def load_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The experiment config of a paper recipe (``PAPER_RECIPES``), paths not required on disk."""
    from pipeline.config import load_config

    path, recipe_overrides = PAPER_RECIPES[name]
    return load_config(EXPERIMENTS / path, [*recipe_overrides, *overrides], check_paths=False)


def recipe_memory(name: str, **kwargs: Any) -> dict[str, dict[str, float]]:
    return experiment_memory(load_recipe(name), **kwargs)


def format_memory(name: str, table: dict[str, dict[str, float]]) -> str:
    width = max([8, *map(len, table)])
    header = (
        f"{'stage':{width}} {'params B':>9} {'trainable B':>12} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'activ.':>8} {'total GB':>9}"
    )
    lines = [f"recipe {name}", header]
    for stage, m in table.items():
        lines.append(
            f"{stage:{width}} {m['params_total']:9.2f} {m['params_trainable']:12.3f} {m['weights_gb']:8.1f} "
            f"{m['gradients_gb']:8.1f} {m['optimizer_gb']:8.1f} {m['activations_gb']:8.1f} "
            f"{m['total_gb']:9.1f}"
        )
    return "\n".join(lines)


def to_json(tables: dict[str, Any]) -> str:
    return json.dumps(tables)
