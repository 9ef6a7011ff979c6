"""Build the model parts from the model config: every part through ``from_pretrained`` (training), or the
same shapes from the checkpoints' configs (``weights="none"``: ``medpipe params`` / ``memory``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig
from torch import nn

from datamodules.images import ImageTransform
from lightningmodules.models.aggregation import TokenAggregation
from lightningmodules.models.cmoe import CMoEConnector
from lightningmodules.models.connector import LinearConnector, MLPConnector
from lightningmodules.models.language import (
    IMAGE_TOKEN,
    causal_lm_from_config,
    load_causal_lm,
    load_tokenizer,
    torch_dtype,
)
from lightningmodules.models.multimodal import MultimodalLM
from lightningmodules.models.vision import VisionTower, load_vision_model, vision_model_from_config
from lightningmodules.models.vision_timm import (
    TimmVisionEncoder,
    import_timm,
    load_timm_vision,
    timm_transform_settings,
)
from medcore.conversations import conversation_template
from medcore.paths import TIMM_PREFIX, is_timm_path
from pipeline.architectures import Architecture, architecture_for
from pipeline.config.errors import ConfigError
from pipeline.grounding_factory import build_grounded, grounding_tokens
from pipeline.importers import (
    PART_PREFIXES,
    CheckpointLayoutError,
    apply_import_structure,
    detect_format,
    import_checkpoint,
    imported_parts,
    llm_config_dict,
    vision_config_dict,
)
from pipeline.importers.checkpoints import read_config
from pipeline.zoo import resolve_model_path

Weights = Literal["pretrained", "none"]
WEIGHTS: tuple[str, ...] = ("pretrained", "none")


@dataclass
class BuiltModel:
    model: MultimodalLM
    tokenizer: Any
    transform: ImageTransform
    sam_transform: Any = None  # grounded models (model.grounding): SAM's input transform
    region_grid_size: int | None = None  # grounded models with a region encoder: its patch grid (data side)


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


def build_model(
    cfg: DictConfig,
    *,
    cache_dir: str | Path | None = None,
    weights: Weights = "pretrained",
    device: str | torch.device | None = None,
    conversation: str | None = None,
) -> BuiltModel:
    """Vision tower, connector, causal LM (and MedPLIB's grounding head) from the ``model`` section of an
    experiment config.

    ``weights="pretrained"`` (training, evaluation): every part from its checkpoint. ``weights="none"``
    (``medpipe params`` / ``memory``): the same shapes from the checkpoints' configs with fresh weights,
    no weight file read; a path absent on disk falls back to the built-in architecture its name matches
    (``pipeline/architectures.py``), logged in one line; without the LLM's tokenizer files ``tokenizer`` is
    None and the added tokens get the ids after the released vocabulary. ``device``: where parameters are
    created (``"meta"``: no memory); None keeps the loaders' default. ``conversation``: a LLaVA conversation
    preset whose template replaces the one ``model.llm`` sets (a stage's ``conversation``); None: ``model.llm``'s.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    for path in _tiny_paths(cfg):  # built (trained and saved) on first use: never under the device context
        resolve_model_path(path, cache_dir)
    pretrained = weights == "pretrained"
    with torch.device(device) if device is not None else contextlib.nullcontext():
        built = _build(cfg, cache_dir=cache_dir, pretrained=pretrained, conversation=conversation)
        if not pretrained and cfg.get("init") is not None:  # shapes only: the checkpoint's structure (MoE layers)
            try:
                apply_import_structure(built.model, model_cfg=cfg)
            except CheckpointLayoutError as error:
                raise ConfigError(f"model.init: {error}") from None
    if pretrained and cfg.get("init") is not None:  # a released checkpoint fills what it has, strictly
        try:
            import_checkpoint(built.model, model_cfg=cfg)  # its structure (e.g. MoE layers) first, then weights
        except CheckpointLayoutError as error:
            raise ConfigError(f"model.init: {error}") from None
    return built


def checkpoint_prefixes(cfg: DictConfig) -> tuple[str, ...]:
    """State-dict prefixes of the parts a pretrained build reads from checkpoint files: the vision encoder, the
    LLM (its added-token rows are the mean of the read ones), SAM, and what ``model.init`` fills. Every other
    weight (connector, region adapter, SEG projection, ...) is initialised at random, so a run's first
    hand-over carries it (``pipeline/handover.py``): restoring never depends on the random state of a build."""
    prefixes = ["vision.encoder.", "llm."]
    if cfg.get("grounding") is not None:
        prefixes.append("grounding.sam.")
    prefixes += [PART_PREFIXES[part] for part in sorted(imported_parts(cfg.get("init")))]
    return tuple(dict.fromkeys(prefixes))


def _tiny_paths(cfg: DictConfig) -> list[str]:
    grounding = cfg.get("grounding")
    paths = [cfg.llm.path, cfg.vision.path] + ([grounding.sam_path] if grounding is not None else [])
    return [p for p in paths if str(p).startswith("tiny:")]


def _build(
    cfg: DictConfig, *, cache_dir: str | Path | None, pretrained: bool, conversation: str | None = None
) -> BuiltModel:
    # parts a released checkpoint fills (model.init) are made from their configs only: no second load
    imported = imported_parts(cfg.get("init")) if pretrained else set()
    # the vision side first (loading it draws no random numbers): a patch grid the aggregation cannot
    # handle fails here, before the LLM loads
    encoder, transform = _vision_encoder(
        cfg.vision, cache_dir=cache_dir, pretrained=pretrained and "vision" not in imported
    )
    encoder = encoder.to(torch_dtype(cfg.vision.dtype))  # every tower kind; its trainable weights go float32 later
    vision = VisionTower(
        encoder=encoder,
        select_layer=cfg.vision.select_layer,
        select_feature=cfg.vision.select_feature,
        frozen=True,
        image_size=transform.output_size[0],
        output_norm=cfg.vision.get("output_norm", False),
    )
    aggregation = TokenAggregation(mode=cfg.connector.aggregation, pool=cfg.connector.pool)
    try:
        num_tokens, in_dim = aggregation.output_shape(vision.num_tokens, vision.hidden_size)
    except ValueError as e:
        raise ConfigError(f"model.connector.aggregation: {e}") from None
    extra_tokens = [IMAGE_TOKEN] + grounding_tokens(cfg)
    llm, tokenizer, token_ids = _language_model(
        cfg.llm,
        extra_tokens,
        cache_dir=cache_dir,
        pretrained=pretrained and "llm" not in imported,
        conversation=conversation,
    )
    if cfg.llm.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    connector = build_connector(cfg.connector, in_dim=in_dim, out_dim=llm.config.hidden_size)
    model = MultimodalLM(
        vision=vision,
        aggregation=aggregation,
        connector=connector,
        llm=llm,
        image_token_id=token_ids[IMAGE_TOKEN],
        num_image_tokens=num_tokens,
    )
    if cfg.get("grounding") is not None:  # MedPLIB: SAM grounding head + region adapter
        model, sam_transform = build_grounded(
            cfg.grounding,
            model,
            token_ids=token_ids,
            cache_dir=cache_dir,
            # a checkpoint with the grounding head (model.init: medplib) fills SAM: made from its config only
            weights="pretrained" if pretrained and "grounding" not in imported else "none",
        )
        return BuiltModel(
            model=model,
            tokenizer=tokenizer,
            transform=transform,
            sam_transform=sam_transform,
            region_grid_size=None if model.region is None else model.region.grid_size,
        )
    return BuiltModel(model=model, tokenizer=tokenizer, transform=transform)


def _language_model(
    cfg: DictConfig,
    extra_tokens: list[str],
    *,
    cache_dir: str | Path | None,
    pretrained: bool,
    conversation: str | None = None,
) -> tuple[nn.Module, Any, dict[str, int]]:
    """``(llm, tokenizer, ids of extra_tokens)`` for ``model.llm`` (tokenizer None: a built-in architecture);
    ``conversation`` overrides ``model.llm.conversation`` (and ``chat_template``) for the tokenizer's template."""
    llm_dir = resolve_model_path(cfg.path, cache_dir)
    options = {
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": cfg.attn_implementation,
    }
    if not pretrained and not llm_dir.is_dir():
        architecture = architecture_for("model.llm.path", cfg.path, "llm")
        token_ids = {token: architecture.tokenizer_size + i for i, token in enumerate(extra_tokens)}
        vocab_size = architecture.tokenizer_size + len(extra_tokens)
        return causal_lm_from_config(architecture.hf_config(), vocab_size=vocab_size, **options), None, token_ids
    tokenizer = load_tokenizer(
        llm_dir,
        extra_special_tokens=extra_tokens,
        chat_template=cfg.chat_template,
        trust_remote_code=cfg.trust_remote_code,
    )
    preset = conversation if conversation is not None else cfg.get("conversation")
    if preset is not None:  # a LLaVA conversation preset replaces the tokenizer's template
        tokenizer.chat_template = conversation_template(preset, add_bos=adds_bos(tokenizer))
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in extra_tokens}
    from transformers import AutoConfig

    llava_llm = llm_config_dict(llm_dir)  # a LLaVA folder: its LLM's config (weights come through model.init)
    if pretrained and llava_llm is not None:
        raise ConfigError(
            f"model.llm.path: {llm_dir} is a LLaVA checkpoint (config.json model_type "
            f"{read_config(llm_dir).get('model_type')!r}): set model.init: {{format: {detect_format(llm_dir)}, "
            f"path: {llm_dir}}}"
        )
    if pretrained:
        return load_causal_lm(llm_dir, vocab_size=len(tokenizer), **options), tokenizer, token_ids
    if llava_llm is not None:
        config = AutoConfig.for_model(**llava_llm)
    else:
        config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=cfg.trust_remote_code)
    return causal_lm_from_config(config, vocab_size=len(tokenizer), **options), tokenizer, token_ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends its BOS when it tokenises a text (Llama, Mistral: yes; Phi-2, StableLM-2,
    Qwen: no): LLaVA's prompts then start with it, so a conversation preset writes ``{{ bos_token }}``."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def _vision_encoder(
    cfg: DictConfig, *, cache_dir: str | Path | None, pretrained: bool
) -> tuple[nn.Module, ImageTransform]:
    """The vision encoder of ``model.vision`` and its image transform."""
    if is_timm_path(cfg.path):  # e.g. Uni-Med's EVA-CLIP ViT-g/14 (optional extra medpipe[timm])
        if pretrained:
            encoder = load_timm_vision(cfg.path, checkpoint=cfg.checkpoint, select_layer=cfg.select_layer)
            return encoder, ImageTransform(**timm_transform_settings(encoder), pad_square=cfg.pad_square)
        try:
            timm = import_timm()
        except ImportError:
            architecture = architecture_for(
                "model.vision.path", cfg.path, "vision", reason="needs timm (not installed)"
            )
            return vision_model_from_config(architecture.hf_config()), _preset_transform(architecture, cfg.pad_square)
        model = timm.create_model(cfg.path.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=0)
        encoder = TimmVisionEncoder(model, select_layer=cfg.select_layer)
        return encoder, ImageTransform(**timm_transform_settings(encoder), pad_square=cfg.pad_square)
    vision_dir = resolve_model_path(cfg.path, cache_dir)
    if pretrained:
        return load_vision_model(vision_dir), ImageTransform.from_pretrained(vision_dir, pad_square=cfg.pad_square)
    if vision_dir.is_dir():
        from transformers import AutoConfig

        llava_vision = vision_config_dict(vision_dir)  # an hf_llava folder: its tower's config
        config = AutoConfig.for_model(**llava_vision) if llava_vision else AutoConfig.from_pretrained(vision_dir)
        encoder = vision_model_from_config(config)
        return encoder, ImageTransform.from_pretrained(vision_dir, pad_square=cfg.pad_square)
    architecture = architecture_for("model.vision.path", cfg.path, "vision")
    return vision_model_from_config(architecture.hf_config()), _preset_transform(architecture, cfg.pad_square)


def _preset_transform(architecture: Architecture, pad_square: bool) -> ImageTransform:
    size = architecture.image_size
    return ImageTransform(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=architecture.image_mean,
        image_std=architecture.image_std,
        pad_square=pad_square,
    )
