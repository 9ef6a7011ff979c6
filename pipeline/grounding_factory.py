"""MedPLIB parts from ``model.grounding``: SAM (HF dir, tiny:<name>, or SAM-Med2D through the converter),
the grounding head, the region adapter, and the grounded model that holds them."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from datamodules.images import SamImageTransform
from lightningmodules.models.grounded import GROUNDING_TOKENS, GroundedMultimodalLM
from lightningmodules.models.grounding import SEG_TOKEN, GroundingHead, load_sam
from lightningmodules.models.multimodal import MultimodalLM
from lightningmodules.models.region import REGION_PLACEHOLDER, RegionEncoder
from pipeline.architectures import architecture_for, say_once
from pipeline.zoo import resolve_model_path


def grounding_tokens(cfg: DictConfig) -> list[str]:
    """Tokens to add to the tokenizer for ``model`` config ``cfg`` (none without ``grounding``)."""
    return list(GROUNDING_TOKENS) if cfg.get("grounding") is not None else []


def load_grounding_sam(
    cfg: DictConfig, cache_dir: str | Path | None = None, *, weights: str = "pretrained"
) -> tuple[nn.Module, SamImageTransform]:
    """The ``SamModel`` and SAM's input transform for ``model.grounding``; ``weights="none"``: the same
    shapes from the config (or a built-in architecture when ``sam_path`` is absent), no weight file read."""
    from transformers import SamConfig, SamModel

    pretrained = weights == "pretrained"
    if cfg.sam_format == "sam_med2d":
        from lightningmodules.models.sam_convert import SAM_PIXEL_MEAN, SAM_PIXEL_STD, load_sam_med2d, sam_med2d_config

        path = Path(cfg.sam_path).expanduser()
        if pretrained:
            sam = load_sam_med2d(path, allow_missing_adapters=cfg.sam_allow_missing_adapters)
        else:  # the converter always builds this architecture: the file only brings the weights
            if not path.is_file():
                say_once(
                    f"model.grounding.sam_path {cfg.sam_path} not found: using the built-in SAM-Med2D ViT-B "
                    "architecture (shapes only, no weights)"
                )
            sam = SamModel(sam_med2d_config())
        transform = SamImageTransform(
            image_size=int(sam.config.vision_config.image_size),
            image_mean=[m / 255 for m in SAM_PIXEL_MEAN],
            image_std=[s / 255 for s in SAM_PIXEL_STD],
        )
        return sam, transform
    sam_dir = resolve_model_path(cfg.sam_path, cache_dir)
    if pretrained:
        return load_sam(sam_dir), SamImageTransform.from_pretrained(sam_dir)
    if sam_dir.is_dir():
        return SamModel(SamConfig.from_pretrained(sam_dir)), SamImageTransform.from_pretrained(sam_dir)
    architecture = architecture_for("model.grounding.sam_path", cfg.sam_path, "sam")
    return SamModel(architecture.hf_config()), SamImageTransform(image_size=architecture.image_size)


def build_grounded(
    cfg: DictConfig,
    model: MultimodalLM,
    *,
    token_ids: dict[str, int],
    cache_dir: str | Path | None = None,
    weights: str = "pretrained",
) -> tuple[GroundedMultimodalLM, SamImageTransform]:
    """Wrap the parts of ``model`` into a :class:`GroundedMultimodalLM` (``cfg`` = ``model.grounding``);
    ``token_ids``: the tokenizer's ids of the grounding tokens."""
    sam, sam_transform = load_grounding_sam(cfg, cache_dir, weights=weights)
    llm_hidden = int(model.llm.config.hidden_size)
    head = GroundingHead(sam=sam, llm_hidden_size=llm_hidden, train_mask_decoder=cfg.train_mask_decoder)
    region = None
    if cfg.region:
        grid = int(round(model.vision.num_tokens**0.5))
        if grid * grid != model.vision.num_tokens:
            raise ValueError(
                f"model.grounding.region needs a square patch grid; the vision tower gives "
                f"{model.vision.num_tokens} tokens (set vision.select_feature: patch)"
            )
        region = RegionEncoder(
            vision_hidden_size=model.vision.hidden_size,
            llm_hidden_size=llm_hidden,
            grid_size=grid,
            pooling=cfg.region_pooling,
            max_points=cfg.region_max_points,
        )
    grounded = GroundedMultimodalLM(
        vision=model.vision,
        aggregation=model.aggregation,
        connector=model.connector,
        llm=model.llm,
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
        grounding=head,
        seg_token_id=token_ids[SEG_TOKEN],
        region=region,
        region_token_id=token_ids[REGION_PLACEHOLDER] if region is not None else None,
    )
    return grounded, sam_transform
