"""Vision tower: any HF vision encoder directory -> patch features from a chosen layer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SELECT_FEATURES = ("patch", "cls_patch")


def vision_model_class(config) -> type:
    """``CLIPVisionModel`` / ``SiglipVisionModel`` for CLIP / SigLIP configs (full or vision-only), else
    ``AutoModel``: full checkpoints (text + vision) load only their vision weights."""
    from transformers import AutoModel, CLIPVisionModel, SiglipVisionModel

    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_vision_model"):
        return CLIPVisionModel
    if model_type in ("siglip", "siglip_vision_model"):
        return SiglipVisionModel
    return AutoModel


def load_vision_model(path: str | Path) -> nn.Module:
    """Load the vision part of a CLIP / SigLIP / generic vision checkpoint directory."""
    from transformers import AutoConfig

    return vision_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path)


def vision_model_from_config(config) -> nn.Module:
    """The model :func:`load_vision_model` loads, with fresh weights (on the current default device)."""
    from transformers import AutoModel

    model_class = vision_model_class(config)
    if model_class is AutoModel:
        return AutoModel.from_config(config)
    return model_class(getattr(config, "vision_config", config))


class VisionTower(nn.Module):
    """Runs the encoder and returns hidden states of ``select_layer`` (LLaVA: -2), CLS dropped.

    ``frozen`` keeps the weights fixed and runs without autograd, as every recipe here does.
    """

    def __init__(
        self, *, encoder: nn.Module, select_layer: int = -2, select_feature: str = "patch", frozen: bool = True
    ) -> None:
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        self.encoder = encoder
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.frozen = frozen
        config = encoder.config
        self.hidden_size = int(config.hidden_size)
        self.image_size = int(config.image_size)
        self.patch_size = int(config.patch_size)
        self.grid_size = self.image_size // self.patch_size
        # CLIP-style encoders prepend a CLS token; SigLIP does not; timm towers say how many (CLS, registers)
        self.num_prefix_tokens = int(
            getattr(encoder, "num_prefix_tokens", int(getattr(config, "model_type", "").startswith("clip")))
        )
        self.has_cls = self.num_prefix_tokens > 0
        if frozen:
            self.encoder.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.select_feature == "cls_patch" and self.has_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, D_vision)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            dtype = next(self.encoder.parameters()).dtype
            out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            features = out.hidden_states[self.select_layer]  # (N, 1 + P, D) for CLIP
        if self.has_cls and self.select_feature == "patch":
            features = features[:, self.num_prefix_tokens :]  # (N, P, D)
        return features
