"""MedPLIB parts from ``model.grounding``: SAM (HF dir, tiny:<name>, or SAM-Med2D through the converter),
the grounding head, the region adapter, and the grounded model that holds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from lightningmodules.models.grounded import GROUNDING_TOKENS, GroundedMultimodalLM
from lightningmodules.models.grounding import SEG_TOKEN, GroundingHead, SamImageTransform, load_sam
from lightningmodules.models.multimodal import MultimodalLM
from lightningmodules.models.region import REGION_PLACEHOLDER, RegionEncoder
from lightningmodules.models.tiny import resolve_model_path


def grounding_tokens(cfg: DictConfig) -> list[str]:
    """Tokens to add to the tokenizer for ``model`` config ``cfg`` (none without ``grounding``)."""
    return list(GROUNDING_TOKENS) if cfg.get("grounding") is not None else []


def load_grounding_sam(cfg: DictConfig, cache_dir: str | Path | None = None) -> tuple[nn.Module, SamImageTransform]:
    """The ``SamModel`` and SAM's input transform for ``model.grounding``."""
    if cfg.sam_format == "sam_med2d":
        from lightningmodules.models.sam_convert import SAM_PIXEL_MEAN, SAM_PIXEL_STD, load_sam_med2d

        sam = load_sam_med2d(Path(cfg.sam_path).expanduser(), allow_missing_adapters=cfg.sam_allow_missing_adapters)
        transform = SamImageTransform(
            image_size=int(sam.config.vision_config.image_size),
            image_mean=[m / 255 for m in SAM_PIXEL_MEAN],
            image_std=[s / 255 for s in SAM_PIXEL_STD],
        )
        return sam, transform
    sam_dir = resolve_model_path(cfg.sam_path, cache_dir)
    return load_sam(sam_dir), SamImageTransform.from_pretrained(sam_dir)


def build_grounded(
    cfg: DictConfig, model: MultimodalLM, *, tokenizer: Any, transform: Any, cache_dir: str | Path | None = None
) -> tuple[GroundedMultimodalLM, SamImageTransform]:
    """Wrap the parts of ``model`` into a :class:`GroundedMultimodalLM` (``cfg`` = ``model.grounding``)."""
    sam, sam_transform = load_grounding_sam(cfg, cache_dir)
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
        region = RegionEncoder(vision_hidden_size=model.vision.hidden_size, llm_hidden_size=llm_hidden, grid_size=grid)
    grounded = GroundedMultimodalLM(
        vision=model.vision,
        aggregation=model.aggregation,
        connector=model.connector,
        llm=model.llm,
        image_token_id=model.image_token_id,
        num_image_tokens=model.num_image_tokens,
        grounding=head,
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        region=region,
        region_token_id=tokenizer.convert_tokens_to_ids(REGION_PLACEHOLDER) if region is not None else None,
        image_transform=transform,
    )
    return grounded, sam_transform
