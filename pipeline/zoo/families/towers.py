"""Real-architecture vision towers at tiny sizes: ``tiny:clip-336``, ``tiny:siglip``, ``tiny:siglip-odd`` and
``tiny:dinov2-reg`` (random weights).

Each is the family's transformers class saved with ``save_pretrained`` beside the image processor file as the
release ships it: openai's CLIP ViT-L/14-336 file with integer ``size`` / ``crop_size``, SigLIP's fixed
height x width resize with mean 0.5, DINOv2's shortest-edge resize then centre crop. Geometry keeps each
family's prefix tokens (CLIP: CLS; SigLIP: none; DINOv2 with registers: CLS + 4 registers) and grid parity:
``siglip-odd`` has an odd grid as SigLIP so400m/14 at 384 px (27 x 27) has.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_TINY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}


@dataclass(frozen=True)
class TowerFamily:
    model_type: str  # transformers config key of the vision model
    config: dict[str, Any]
    processor: dict[str, Any]  # preprocessor_config.json as the family ships it
    grid: int  # patches per side at the processor's output size


def _siglip_processor(size: int) -> dict[str, Any]:
    """SigLIP's preprocessor_config.json: a fixed height x width resize, mean and std 0.5."""
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }


TOWER_FAMILIES: dict[str, TowerFamily] = {
    "clip-336": TowerFamily(  # openai/clip-vit-large-patch14-336 layout (ints, CLIPFeatureExtractor)
        model_type="clip_vision_model",
        config={"image_size": 56, "patch_size": 14, "projection_dim": 32, "hidden_act": "quick_gelu"},
        processor={
            "crop_size": 56,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": _CLIP_MEAN,
            "image_std": _CLIP_STD,
            "resample": 3,
            "size": 56,
        },
        grid=4,
    ),
    "siglip": TowerFamily(  # google/siglip-base-patch16-224 layout, no CLS token
        model_type="siglip_vision_model",
        config={"image_size": 64, "patch_size": 16},
        processor=_siglip_processor(64),
        grid=4,
    ),
    "siglip-odd": TowerFamily(  # so400m/14 at 384 px has a 27 x 27 grid: odd, as here
        model_type="siglip_vision_model",
        config={"image_size": 48, "patch_size": 16},
        processor=_siglip_processor(48),
        grid=3,
    ),
    "dinov2-reg": TowerFamily(  # facebook/dinov2-with-registers-small layout: CLS + 4 registers
        model_type="dinov2_with_registers",
        config={"image_size": 518, "patch_size": 14, "num_register_tokens": 4, "mlp_ratio": 2},
        processor=dict(
            crop_size={"height": 56, "width": 56},
            do_center_crop=True,
            do_convert_rgb=True,
            do_normalize=True,
            do_rescale=True,
            do_resize=True,
            image_mean=_IMAGENET_MEAN,
            image_processor_type="BitImageProcessor",
            image_std=_IMAGENET_STD,
            resample=3,
            rescale_factor=1 / 255,
            size={"shortest_edge": 64},
        ),
        grid=4,
    ),
}


def tower_builder(name: str) -> Callable[[Path, Path], None]:
    family = TOWER_FAMILIES[name]

    def build(out: Path, _cache: Path) -> None:
        from transformers import AutoConfig, AutoModel

        fields = {k: v for k, v in _TINY.items() if not (k == "intermediate_size" and "mlp_ratio" in family.config)}
        config = AutoConfig.for_model(family.model_type, **fields, **family.config)
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(out)
        (out / "preprocessor_config.json").write_text(json.dumps(family.processor, indent=2) + "\n")

    return build
