"""timm vision towers (Uni-Med's EVA-CLIP ViT-g/14 at 224 px) behind the HF-style interface VisionTower uses.

``model.vision.path: timm:<model name>`` (e.g. ``timm:eva_giant_patch14_clip_224``) with
``model.vision.checkpoint: /path/to/weights`` (``.safetensors``, ``.bin`` or ``.pth``; EVA-CLIP / LAVIS
``eva_vit_g.pth`` keys are remapped by timm's own checkpoint filter). Weights are only read from that
local file, never downloaded. timm is an optional extra: ``pip install 'medpipe[timm]'``.

The wrapper exposes what :class:`~lightningmodules.models.vision.VisionTower` reads from an HF encoder:
``config.hidden_size / image_size / patch_size``, ``num_prefix_tokens`` and
``forward(pixel_values, output_hidden_states=True).hidden_states`` where ``hidden_states[i]`` is the
output of block ``i`` (index 0 is the embedding output in HF; it is not computed here). Only the block
``select_layer`` names is computed (timm's ``forward_intermediates`` stops there): with the
default ``-2`` on a 40-block ViT-g that is BLIP-2 / MiniGPT-v2's 39-block EVA output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from medcore.paths import TIMM_PREFIX

INSTALL_HINT = "timm is not installed: `pip install 'medpipe[timm]'` (or `pip install timm`) to use timm: vision towers"


def import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return timm


@dataclass
class TimmOutput:
    hidden_states: tuple[torch.Tensor | None, ...]


class TimmVisionEncoder(nn.Module):
    """A timm ViT / EVA with prefix (CLS) tokens kept in front, as HF CLIP returns them."""

    def __init__(self, model: nn.Module, *, select_layer: int = -2) -> None:
        super().__init__()
        self.model = model
        self.num_blocks = len(model.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.select_layer = select_layer
        self.block = select_layer % (self.num_blocks + 1) - 1  # HF index i = output of block i - 1
        if self.block < 0:
            raise ValueError(
                f"select_layer {select_layer} names the embedding output; pick a block (1..{self.num_blocks} "
                "or negative)"
            )
        img_size = model.patch_embed.img_size
        patch_size = model.patch_embed.patch_size
        self.config = SimpleNamespace(
            hidden_size=int(model.embed_dim),
            image_size=int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size),
            patch_size=int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size),
            model_type="timm",
        )

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True, **_: object) -> TimmOutput:
        """(N, 3, H, W) -> hidden_states with only entry ``select_layer`` filled: (N, prefix + P, D)."""
        intermediates = self.model.forward_intermediates(
            pixel_values,
            indices=[self.block],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        patches, prefix = intermediates[0]  # (N, P, D), (N, prefix, D)
        if patches.ndim == 4:  # NCHW despite NLC (older timm): (N, D, g, g) -> (N, P, D)
            patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([prefix, patches], dim=1) if prefix is not None else patches  # (N, prefix + P, D)
        states: list[torch.Tensor | None] = [None] * (self.num_blocks + 1)
        states[self.block + 1] = tokens
        return TimmOutput(hidden_states=tuple(states))


def load_timm_vision(path: str, *, checkpoint: str | Path | None, select_layer: int = -2) -> TimmVisionEncoder:
    """``timm:<name>`` with weights from the local ``checkpoint`` file."""
    name = str(path).removeprefix(TIMM_PREFIX)
    if checkpoint is None:
        raise ValueError(
            f"model.vision.path {path!r}: set model.vision.checkpoint to the local weights file "
            "(timm towers are never downloaded)"
        )
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"model.vision.checkpoint: weights file not found: {checkpoint}")
    timm = import_timm()
    model = timm.create_model(
        name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(Path(checkpoint).expanduser())}
    )
    return TimmVisionEncoder(model, select_layer=select_layer)


def timm_transform_settings(encoder: TimmVisionEncoder) -> dict[str, Any]:
    """ImageTransform keyword arguments from the timm model's pretrained config (mean, std, size)."""
    cfg = getattr(encoder.model, "pretrained_cfg", None) or {}
    size = encoder.config.image_size
    return {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "image_mean": tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "image_std": tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "resample": 3,
        "do_center_crop": True,
    }
