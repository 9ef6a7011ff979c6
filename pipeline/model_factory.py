"""Build the model parts from the model config: every part through ``from_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from datamodules.images import ImageTransform
from lightningmodules.models.aggregation import TokenAggregation
from lightningmodules.models.cmoe import CMoEConnector
from lightningmodules.models.connector import LinearConnector, MLPConnector
from lightningmodules.models.language import IMAGE_TOKEN, load_causal_lm, load_tokenizer
from lightningmodules.models.multimodal import MultimodalLM
from lightningmodules.models.tiny import resolve_model_path
from lightningmodules.models.vision import VisionTower, load_vision_model
from lightningmodules.models.vision_timm import is_timm_path, load_timm_vision, timm_transform_settings
from pipeline.grounding_factory import build_grounded, grounding_tokens


@dataclass
class BuiltModel:
    model: MultimodalLM
    tokenizer: Any
    transform: ImageTransform
    sam_transform: Any = None  # grounded models (model.grounding): SAM's input transform


def build_connector(cfg: DictConfig, *, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.type == "linear":
        return LinearConnector(in_dim=in_dim, out_dim=out_dim)
    if cfg.type == "mlp":
        return MLPConnector(in_dim=in_dim, out_dim=out_dim)
    if cfg.type == "cmoe":
        return CMoEConnector(
            in_dim=in_dim,
            out_dim=out_dim,
            num_experts=cfg.num_experts,
            router_input=cfg.router_input,
            weighting=cfg.weighting,
            top_k=cfg.top_k,
            router_hidden_ratio=cfg.router_hidden_ratio,
            num_tasks=cfg.num_tasks,
            task_embed_dim=cfg.task_embed_dim,
        )
    raise ValueError(f"unknown connector type {cfg.type!r}")


def build_model(cfg: DictConfig, *, cache_dir: str | Path | None = None) -> BuiltModel:
    """Vision tower, connector and causal LM from the ``model`` section of an experiment config."""
    llm_dir = resolve_model_path(cfg.llm.path, cache_dir)
    tokenizer = load_tokenizer(
        llm_dir,
        extra_special_tokens=[IMAGE_TOKEN] + grounding_tokens(cfg),
        chat_template=cfg.llm.chat_template,
        trust_remote_code=cfg.llm.trust_remote_code,
    )
    llm = load_causal_lm(
        llm_dir,
        vocab_size=len(tokenizer),
        dtype=cfg.llm.dtype,
        trust_remote_code=cfg.llm.trust_remote_code,
        attn_implementation=cfg.llm.attn_implementation,
    )
    if cfg.llm.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_timm_path(cfg.vision.path):  # e.g. Uni-Med's EVA-CLIP ViT-g/14 (optional extra medpipe[timm])
        encoder = load_timm_vision(
            cfg.vision.path, checkpoint=cfg.vision.checkpoint, select_layer=cfg.vision.select_layer
        )
        transform = ImageTransform(**timm_transform_settings(encoder), pad_square=cfg.vision.pad_square)
    else:
        vision_dir = resolve_model_path(cfg.vision.path, cache_dir)
        encoder = load_vision_model(vision_dir)
        transform = ImageTransform.from_pretrained(vision_dir, pad_square=cfg.vision.pad_square)
    vision = VisionTower(
        encoder=encoder, select_layer=cfg.vision.select_layer, select_feature=cfg.vision.select_feature, frozen=True
    )
    aggregation = TokenAggregation(mode=cfg.connector.aggregation, pool=cfg.connector.pool)
    num_tokens, in_dim = aggregation.output_shape(vision.num_tokens, vision.hidden_size)
    connector = build_connector(cfg.connector, in_dim=in_dim, out_dim=llm.config.hidden_size)
    model = MultimodalLM(
        vision=vision,
        aggregation=aggregation,
        connector=connector,
        llm=llm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        num_image_tokens=num_tokens,
    )
    if cfg.get("grounding") is not None:  # MedPLIB: SAM grounding head + region adapter
        model, sam_transform = build_grounded(
            cfg.grounding, model, tokenizer=tokenizer, transform=transform, cache_dir=cache_dir
        )
        return BuiltModel(model=model, tokenizer=tokenizer, transform=transform, sam_transform=sam_transform)
    return BuiltModel(model=model, tokenizer=tokenizer, transform=transform)
