"""Per-GPU memory of a training stage, estimated without a GPU: ``medpipe memory``.

Parameter counts are exact: the models are instantiated on PyTorch's ``meta`` device from their HF
configs (from a checkpoint directory, or from the presets below, copied from the public configs of
the papers' models). The rest is the standard accounting:

- weights: every parameter in its storage dtype (fp32 under ``*-mixed`` precision, bf16/fp16 under
  ``*-true``); gradients: trainable parameters, same dtype; AdamW state: two tensors per trainable
  parameter in the parameter dtype (fp32 under mixed precision);
- sharding: ``fsdp`` / ``deepspeed_stage_3`` divide weights, gradients and optimizer state by the
  number of GPUs, ``deepspeed_stage_2`` gradients and optimizer state, ``deepspeed_stage_1`` the
  optimizer state; ``ddp`` nothing;
- activations of the LLM per micro-batch (Korthikanti et al., 2022, 16-bit activations, memory-
  efficient attention so no s^2 score matrices): ``34 s b h`` bytes per layer, of which the FFN is
  ``19 s b h`` (scaled by k + meta for MoE layers); with gradient checkpointing ``2 s b h`` per layer
  plus one full layer; the frozen vision tower and mask encoder keep no activations. The LM head
  runs only on answer tokens (``answer_tokens``), so logits cost ``b t V 4`` bytes, not ``b s V``.

The figure is a planning estimate: allocator fragmentation, CUDA context (~0.5-1 GB) and temporary
buffers come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GB = 1024**3

# Public configs of the papers' models (fields the estimate needs).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "phi-2": {
        "model_type": "phi",
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "partial_rotary_factor": 0.4,
    },
    "stablelm-2-1.6b": {
        "model_type": "stablelm",
        "vocab_size": 100352,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "partial_rotary_factor": 0.25,
    },
    "clip-vit-l-14-336": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
    "eva-clip-vit-g-14-224": {
        "model_type": "clip_vision_model",
        "hidden_size": 1408,
        "intermediate_size": 6144,
        "num_hidden_layers": 40,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    },
    "sam-vit-b": {"model_type": "sam"},
}

# The papers' recipes: models, visual tokens into the LLM, stages and what each trains.
RECIPES: dict[str, dict[str, Any]] = {
    "uni_med": {
        "llm": "llama-2-7b",
        "vision": "eva-clip-vit-g-14-224",
        "visual_tokens": 64,
        "connector_in": 1408 * 4,
        "connector": "cmoe",
        "num_experts": 5,
        "stages": {"train": {"train": ["connector", "lora"], "lora_r": 8}},
    },
    "med_moe_phi2": {
        "llm": "phi-2",
        "vision": "clip-vit-l-14-336",
        "visual_tokens": 576,
        "connector_in": 1024,
        "connector": "mlp",
        "stages": {
            "stage1": {"train": ["connector"]},
            "stage2": {"train": ["connector", "llm"]},
            "stage3": {"train": ["connector", "ffn"], "moe": {"num_experts": 4, "top_k": 1, "meta": True, "every": 2}},
        },
    },
    "med_moe_stablelm": {
        "llm": "stablelm-2-1.6b",
        "vision": "clip-vit-l-14-336",
        "visual_tokens": 576,
        "connector_in": 1024,
        "connector": "mlp",
        "stages": {
            "stage1": {"train": ["connector"]},
            "stage2": {"train": ["connector", "llm"]},
            "stage3": {"train": ["connector", "ffn"], "moe": {"num_experts": 4, "top_k": 1, "meta": True, "every": 2}},
        },
    },
    "medplib": {
        "llm": "llama-2-7b",
        "vision": "clip-vit-l-14-336",
        "visual_tokens": 576,
        "connector_in": 1024,
        "connector": "mlp",
        "sam": "sam-vit-b",
        "stages": {
            "I": {"train": ["connector"]},
            "II": {"train": ["connector", "lora"], "lora_r": 16},
            "III": {"train": ["lora_ffn", "mask_decoder"], "lora_r": 8},
            "IV": {
                "train": ["router", "mask_decoder"],
                "moe": {"num_experts": 2, "top_k": 1, "meta": False, "every": 1},
            },
        },
    },
}

STRATEGIES = ("ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


@dataclass
class ModelCounts:
    total: int
    llm: int
    ffn_per_layer: int
    layers: int
    hidden: int
    vocab: int
    vision: int = 0
    sam: int = 0
    sam_decoder: int = 0
    connector: int = 0
    linear_shapes: list[tuple[int, int, bool]] = field(default_factory=list)  # LLM Linears: (in, out, is_ffn)


def _config(spec: dict[str, Any]):
    from transformers import AutoConfig, CLIPVisionConfig, SamConfig

    spec = dict(spec)
    kind = spec.pop("model_type")
    if kind == "clip_vision_model":
        return CLIPVisionConfig(**spec)
    if kind == "sam":
        return SamConfig(**spec)
    return AutoConfig.for_model(kind, **spec)


def _meta_model(spec_or_path: dict[str, Any] | str, *, kind: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, SamModel

    config = _config(spec_or_path) if isinstance(spec_or_path, dict) else AutoConfig.from_pretrained(spec_or_path)
    with torch.device("meta"):
        if kind == "llm":
            return AutoModelForCausalLM.from_config(config)
        if kind == "sam":
            return SamModel(config)
        vision_config = getattr(config, "vision_config", config)
        return CLIPVisionModel(vision_config)


def count_model(
    llm: dict | str,
    vision: dict | str | None,
    sam: dict | str | None,
    *,
    connector_in: int,
    connector: str = "mlp",
    num_experts: int = 5,
) -> ModelCounts:
    from torch import nn

    lm = _meta_model(llm, kind="llm")
    cfg = lm.config
    hidden, layers = int(cfg.hidden_size), int(cfg.num_hidden_layers)
    decoder_layer = lm.get_decoder().layers[0]
    ffn = sum(p.numel() for p in decoder_layer.mlp.parameters())
    shapes = [
        (m.in_features, m.out_features, ".mlp." in name)
        for name, m in lm.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in name
    ]
    counts = ModelCounts(
        total=0,
        llm=sum(p.numel() for p in lm.parameters()),
        ffn_per_layer=ffn,
        layers=layers,
        hidden=hidden,
        vocab=int(cfg.vocab_size),
        linear_shapes=shapes,
    )
    if vision is not None:
        counts.vision = sum(p.numel() for p in _meta_model(vision, kind="vision").parameters())
    if sam is not None:
        sam_model = _meta_model(sam, kind="sam")
        counts.sam = sum(p.numel() for p in sam_model.parameters())
        counts.sam_decoder = sum(p.numel() for p in sam_model.mask_decoder.parameters())
    mlp = connector_in * hidden + hidden + hidden * hidden + hidden
    counts.connector = mlp * (num_experts if connector == "cmoe" else 1)
    counts.total = counts.llm + counts.vision + counts.sam + counts.connector
    return counts


def lora_params(shapes: list[tuple[int, int, bool]], r: int, *, ffn_only: bool = False) -> int:
    """A and B matrices of rank ``r`` on every LLM Linear (or only the FFN ones)."""
    return sum(r * (i + o) for i, o, is_ffn in shapes if is_ffn or not ffn_only)


def stage_memory(
    counts: ModelCounts,
    stage: dict[str, Any],
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
    moe = stage.get("moe")
    moe_layers = counts.layers // moe["every"] if moe else 0
    # converted layers hold E expert copies (+ the original FFN as meta expert) instead of one FFN
    extra_experts = moe_layers * counts.ffn_per_layer * (moe["num_experts"] - (0 if moe["meta"] else 1)) if moe else 0
    router = moe_layers * (counts.hidden + 1) * moe["num_experts"] if moe else 0  # Linear(h, E) with bias
    total = counts.total + extra_experts + router

    trainable = 0
    for group in stage["train"]:
        if group == "connector":
            trainable += counts.connector
        elif group == "llm":
            trainable += counts.llm
        elif group == "lora":
            trainable += lora_params(counts.linear_shapes, stage.get("lora_r", 8))
        elif group == "lora_ffn":
            trainable += lora_params(counts.linear_shapes, stage.get("lora_r", 8), ffn_only=True)
        elif group == "ffn":  # every FFN: the MoE experts (and meta) where converted, the dense ones elsewhere
            trainable += counts.layers * counts.ffn_per_layer + extra_experts
        elif group == "mask_decoder":
            trainable += counts.sam_decoder
        elif group == "router":
            trainable += router
    shard_weights = devices if strategy in ("fsdp", "deepspeed_stage_3") else 1
    shard_grads = devices if strategy in ("fsdp", "deepspeed_stage_2", "deepspeed_stage_3") else 1
    shard_optim = devices if strategy != "ddp" else 1
    weights = total * param_bytes / shard_weights
    grads = trainable * param_bytes / shard_grads
    optim = trainable * 2 * param_bytes / shard_optim

    sbh = seq_len * micro_batch * counts.hidden
    ffn_scale = (moe["top_k"] + (1 if moe["meta"] else 0)) if moe else 1
    per_layer = (34 - 19) * sbh + 19 * sbh * ffn_scale
    if gradient_checkpointing:
        activations = 2 * sbh * counts.layers + per_layer
    else:
        activations = per_layer * counts.layers
    logits = micro_batch * answer_tokens * counts.vocab * 4
    out = {
        "params_total": total / 1e9,
        "params_trainable": trainable / 1e9,
        "weights_gb": weights / GB,
        "gradients_gb": grads / GB,
        "optimizer_gb": optim / GB,
        "activations_gb": (activations + logits) / GB,
    }
    out["total_gb"] = out["weights_gb"] + out["gradients_gb"] + out["optimizer_gb"] + out["activations_gb"]
    return out


def recipe_memory(name: str, **kwargs: Any) -> dict[str, dict[str, float]]:
    recipe = RECIPES[name]
    counts = count_model(
        PRESETS[recipe["llm"]],
        PRESETS[recipe["vision"]],
        PRESETS[recipe["sam"]] if recipe.get("sam") else None,
        connector_in=recipe["connector_in"],
        connector=recipe["connector"],
        num_experts=recipe.get("num_experts", 5),
    )
    seq_len = kwargs.pop("seq_len", None) or 2048
    return {stage: stage_memory(counts, spec, seq_len=seq_len, **kwargs) for stage, spec in recipe["stages"].items()}


def format_memory(name: str, table: dict[str, dict[str, float]]) -> str:
    header = (
        f"{'stage':8} {'params B':>9} {'trainable B':>12} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'activ.':>8} {'total GB':>9}"
    )
    lines = [f"recipe {name}", header]
    for stage, m in table.items():
        lines.append(
            f"{stage:8} {m['params_total']:9.2f} {m['params_trainable']:12.3f} {m['weights_gb']:8.1f} "
            f"{m['gradients_gb']:8.1f} {m['optimizer_gb']:8.1f} {m['activations_gb']:8.1f} "
            f"{m['total_gb']:9.1f}"
        )
    return "\n".join(lines)


def to_json(tables: dict[str, Any]) -> str:
    return json.dumps(tables)
