"""``medpipe params CONFIG``: total parameters and parameters active per token of an experiment's model.

The multimodal model is built from the checkpoints' configs on PyTorch's ``meta`` device (no weights read,
no memory; ``pipeline/memory.py`` does the same for ``medpipe memory``), then every stage's structural
change is applied in order (router classifier, MoE layers) up to ``stage`` (default: the last), and
``count_parameters`` counts it: everything outside MoE layers is active, in each MoE layer the router,
``top_k`` of the E experts and the meta expert (Med-MoE's headline is the active fraction). When a model
cannot be instantiated on ``meta`` (e.g. remote code that initialises tensors eagerly) the real model is
built from the checkpoints instead (``"device": "cpu"`` in the result).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

log = logging.getLogger("medpipe")


def _meta_multimodal(cfg: DictConfig) -> nn.Module:
    """``MultimodalLM`` with the shapes ``build_model`` would give, on the meta device."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

    from lightningmodules.models.aggregation import TokenAggregation
    from lightningmodules.models.language import IMAGE_TOKEN, load_tokenizer, torch_dtype
    from lightningmodules.models.multimodal import MultimodalLM
    from lightningmodules.models.tiny import resolve_model_path
    from lightningmodules.models.vision import VisionTower
    from pipeline.model_factory import build_connector

    model_cfg = cfg.model
    vision_dir = resolve_model_path(model_cfg.vision.path, cfg.cache_dir)
    llm_dir = resolve_model_path(model_cfg.llm.path, cfg.cache_dir)
    remote = model_cfg.llm.trust_remote_code
    tokenizer = load_tokenizer(
        llm_dir, extra_special_tokens=[IMAGE_TOKEN], chat_template=model_cfg.llm.chat_template, trust_remote_code=remote
    )
    llm_config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=remote)
    vision_config = AutoConfig.from_pretrained(vision_dir)
    vision_type = getattr(vision_config, "model_type", "")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(
            llm_config, trust_remote_code=remote, dtype=torch_dtype(model_cfg.llm.dtype)
        )
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if vision_type in ("clip", "clip_vision_model"):
            encoder = CLIPVisionModel(getattr(vision_config, "vision_config", vision_config))
        elif vision_type in ("siglip", "siglip_vision_model"):
            encoder = SiglipVisionModel(getattr(vision_config, "vision_config", vision_config))
        else:
            encoder = AutoModel.from_config(vision_config)
        vision = VisionTower(
            encoder=encoder,
            select_layer=model_cfg.vision.select_layer,
            select_feature=model_cfg.vision.select_feature,
            frozen=True,
        )
        aggregation = TokenAggregation(mode=model_cfg.connector.aggregation, pool=model_cfg.connector.pool)
        num_tokens, in_dim = aggregation.output_shape(vision.num_tokens, vision.hidden_size)
        connector = build_connector(model_cfg.connector, in_dim=in_dim, out_dim=llm.config.hidden_size)
        return MultimodalLM(
            vision=vision,
            aggregation=aggregation,
            connector=connector,
            llm=llm,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            num_image_tokens=num_tokens,
        )


def apply_stage_structures(cfg: DictConfig, model: nn.Module, *, until: str | None = None) -> list[str]:
    """Apply each stage's structural change (router classifier, MoE layers) in order; returns the stages seen.

    MoE from ``moe.sources`` counts as E upcycled experts: same shapes, so the same counts."""
    from pipeline.moe_stage import DEFAULT_NUM_EXPERTS
    from pipeline.structure import add_modality_classifier, add_moe

    names = list(cfg.stages.keys())
    if until is not None and until not in names:
        raise ValueError(f"stage {until!r} is not in the config (stages: {', '.join(names)})")
    seen = []
    for name in names:
        stage = cfg.stages[name]
        if stage.kind == "router":
            add_modality_classifier(model, list(stage.router.modalities))
        if stage.moe is not None:
            moe = stage.moe
            experts = moe.num_experts or len(moe.sources or []) or DEFAULT_NUM_EXPERTS
            add_moe(
                model,
                layers=moe.layers if isinstance(moe.layers, str) else list(moe.layers),
                num_experts=experts,
                top_k=moe.top_k,
                meta_expert=moe.meta_expert,
                renormalize=moe.renormalize,
                capacity_factor=moe.capacity_factor,
                aux_loss_coef=moe.aux_loss_coef,
                z_loss_coef=moe.z_loss_coef,
            )
        seen.append(name)
        if name == until:
            break
    return seen


def _part_counts(model: nn.Module) -> dict[str, int]:
    parts = {}
    for name in ("vision", "aggregation", "connector", "llm", "modality_classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            parts[name] = sum(p.numel() for p in module.parameters())
    return parts


def experiment_params(cfg: DictConfig, *, stage: str | None = None) -> dict[str, Any]:
    """``{"total", "active_per_token", "active_fraction", ..., "parts", "stage", "device"}`` for the config."""
    from lightningmodules.models.moe import count_parameters

    try:
        model, device = _meta_multimodal(cfg), "meta"
    except Exception as error:  # noqa: BLE001 - any failure of the meta build: count the real model instead
        log.warning("params: the model does not build on the meta device (%s); loading the checkpoints", error)
        from pipeline.model_factory import build_model

        model, device = build_model(cfg.model, cache_dir=cfg.cache_dir).model, "cpu"
    with torch.device(device):  # new experts / routers on meta too: no memory for a 4 x 2.7B-FFN model
        stages = apply_stage_structures(cfg, model, until=stage)
    counts = count_parameters(model)
    counts["embeddings"] = count_parameters(model.llm)["embeddings"]  # the LLM's input + output embeddings
    return {**counts, "parts": _part_counts(model), "stage": stages[-1] if stages else None, "device": device}


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
