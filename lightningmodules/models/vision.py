"""Vision tower: any HF vision encoder directory -> patch features from a chosen layer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
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


def prefix_token_counts(encoder: nn.Module) -> tuple[int, int]:
    """``(cls, registers)``: the tokens an encoder puts before its patch tokens, from its class and config.

    CLS when the embeddings have a class token (CLIP's ``class_embedding``, ViT / DINOv2's ``cls_token``;
    SigLIP has none); registers from ``config.num_register_tokens`` (DINOv2 with registers). A timm tower
    says it itself (``num_prefix_tokens``: CLS and registers).
    """
    if hasattr(encoder, "num_prefix_tokens"):
        prefix = int(encoder.num_prefix_tokens)
        return min(prefix, 1), prefix - min(prefix, 1)
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is None:  # CLIPVisionModel / SiglipVisionModel wrap a vision_model
        embeddings = getattr(getattr(encoder, "vision_model", None), "embeddings", None)
    has_cls = any(hasattr(embeddings, name) for name in ("class_embedding", "cls_token"))
    return int(has_cls), int(getattr(encoder.config, "num_register_tokens", 0) or 0)


class VisionTower(nn.Module):
    """Runs the encoder and returns hidden states of ``select_layer`` (LLaVA: -2), prefix tokens dropped.

    The encoder's sequence is ``[CLS?, registers..., patches]``; ``patch`` keeps the grid x grid patch
    tokens, ``cls_patch`` the CLS token (when there is one) and the patches. ``image_size``: the pixel
    size the transform delivers (default the config's; DINOv2 interpolates its position embeddings, so
    its 224 px crops give a 16 x 16 grid whatever ``config.image_size`` says). ``frozen`` keeps the
    weights fixed and runs without autograd, as every recipe here does.

    ``output_norm`` adds BLIP-2 / MiniGPT-v2 / Uni-Med's ``ln_vision``: a ``LayerNorm(hidden_size)`` over the
    selected tokens (per token, so the same whether the prefix tokens are dropped before or after it), before
    the connector's aggregation. Created as the released code creates it (Uni-Med@63b9dfb
    uni_med/models/base_model.py:177, 271-277: ``nn.LayerNorm(num_features)`` with torch's defaults, weight 1,
    bias 0, eps 1e-5, computed in float32) and frozen with the encoder. Uni-Med never trains or loads it: its
    checkpoints keep only parameters that require grad (runner_base.py:580-587), so it stays the identity
    affine; its weights are in this model's state dict, so a hand-over carries whatever they are.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        select_layer: int = -2,
        select_feature: str = "patch",
        frozen: bool = True,
        image_size: int | None = None,
        output_norm: bool = False,
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
        self.image_size = int(image_size if image_size is not None else config.image_size)
        self.patch_size = int(config.patch_size)
        self.grid_size = self.image_size // self.patch_size
        num_cls, self.num_registers = prefix_token_counts(encoder)
        self.has_cls = num_cls > 0
        self.num_prefix_tokens = num_cls + self.num_registers
        self.output_norm = nn.LayerNorm(self.hidden_size, eps=1e-5) if output_norm else None
        if frozen:
            self.encoder.requires_grad_(False)
            if self.output_norm is not None:
                self.output_norm.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.select_feature == "cls_patch" and self.has_cls)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_tokens, D_vision)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            dtype = next(self.encoder.parameters()).dtype
            out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
            features = out.hidden_states[self.select_layer]  # (N, prefix + P, D)
        expected = self.num_prefix_tokens + self.num_patches
        if features.shape[1] != expected:  # a wrong count would shift one image's tokens into the next's slots
            raise ValueError(
                f"vision tower: {features.shape[1]} tokens per image, expected {self.num_prefix_tokens} prefix "
                f"(CLS, registers) + {self.grid_size}x{self.grid_size} patches = {expected}"
            )
        patches = features[:, self.num_prefix_tokens :]  # (N, P, D)
        if self.select_feature == "cls_patch" and self.has_cls:
            patches = torch.cat([features[:, :1], patches], dim=1)  # (N, 1 + P, D): CLS, registers left out
        return self.normalize(patches)

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """``output_norm`` over the selected tokens, in float32 and back to their dtype (the released
        ``LayerNorm`` subclass for fp16 towers); unchanged without one."""
        if self.output_norm is None:
            return tokens
        norm = self.output_norm
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = F.layer_norm(tokens.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        return out.to(tokens.dtype)
