"""``tiny:clip``: a 3-layer CLIP vision tower pretrained on phantom attributes read from its patch tokens."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.zoo.pretrain import pretrain

log = logging.getLogger(__name__)

VISION_IMAGE_SIZE = 64
VISION_PATCH = 8
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GLOBAL_TARGETS = ("modality", "part", "count", "organ", "side")


def phantom_vision_batch(n: int, seed: int, image_size: int = VISION_IMAGE_SIZE):
    """Pixels as the data pipeline delivers them (JPEG round trip + CLIP transform) and targets."""
    from PIL import Image

    from datamodules.images import ImageTransform
    from datamodules.synthetic.phantoms import BODY_PARTS, LESION_ORGANS, MODALITIES, make_phantom

    organ_names = sorted({o for organs in LESION_ORGANS.values() for o in organs})
    transform = ImageTransform(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    grid = image_size // VISION_PATCH
    pixels, modality, part, count, organ, side, patch_lesion = [], [], [], [], [], [], []
    for i in range(n):
        p = make_phantom(i, seed=seed, size=128)
        buf = io.BytesIO()
        Image.fromarray(p.image).convert("RGB").save(buf, format="JPEG", quality=95)
        pixels.append(transform(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        modality.append(MODALITIES.index(p.modality))
        part.append(BODY_PARTS.index(p.body_part))
        count.append(p.lesion_count)
        organ.append(organ_names.index(p.lesion_organ) + 1 if p.lesions else 0)
        side.append({None: 0, "left": 1, "right": 2}[p.lesion_side])
        lesion = p.lesion_mask if p.lesion_mask is not None else np.zeros(p.image.shape, bool)
        cell = lesion.shape[0] // grid
        per_patch = lesion.reshape(grid, cell, grid, cell).mean(axis=(1, 3)) > 0.05  # (g, g)
        patch_lesion.append(torch.from_numpy(per_patch.reshape(-1)))
    targets = {
        "modality": torch.tensor(modality),
        "part": torch.tensor(part),
        "count": torch.tensor(count),
        "organ": torch.tensor(organ),
        "side": torch.tensor(side),
        "patch_lesion": torch.stack(patch_lesion).float(),
    }
    return torch.stack(pixels), targets, len(organ_names) + 1


def build_clip(out: Path, _cache: Path, pretrain_steps: int = 1000) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH,
        projection_dim=64,
    )
    model = CLIPVisionModel(config)
    if pretrain_steps > 0:
        pretrain_vision(model, steps=pretrain_steps)
    model.save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)


def pretrain_vision(
    model: nn.Module, *, steps: int, select_layer: int = -2, peak_lr: float = 4e-3, batch_size: int = 64
) -> dict[str, float]:
    """Supervised pretraining on phantom attributes, read from the ``select_layer`` patch tokens.

    Global attributes are predicted from the mean patch token, lesions also per patch, so the
    patch tokens the LLM sees carry what the questions ask about.
    """
    pixels, targets, n_organs = phantom_vision_batch(3000, seed=1)
    val_pixels, val_targets, _ = phantom_vision_batch(300, seed=2)
    d = model.config.hidden_size
    sizes = {"modality": 3, "part": 3, "count": 3, "organ": n_organs, "side": 3}
    heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in sizes.items()})
    heads["patch_lesion"] = nn.Linear(d, 1)

    def run(px: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = model(pixel_values=px, output_hidden_states=True).hidden_states[select_layer][:, 1:]  # (B, P, D)
        out = {k: heads[k](hidden.mean(1)) for k in GLOBAL_TARGETS}  # each (B, n_k)
        out["patch_lesion"] = heads["patch_lesion"](hidden).squeeze(-1)  # (B, P)
        return out

    def batch_loss(idx: torch.Tensor, _step: int) -> torch.Tensor:
        out = run(pixels[idx])
        loss = sum(F.cross_entropy(out[k], targets[k][idx]) for k in GLOBAL_TARGETS)
        return loss + 2.0 * F.binary_cross_entropy_with_logits(out["patch_lesion"], targets["patch_lesion"][idx])

    model.train()
    pretrain(
        list(model.parameters()) + list(heads.parameters()),
        batch_loss,
        steps=steps,
        n_items=pixels.shape[0],
        batch_size=batch_size,
        peak_lr=peak_lr,
        weight_decay=0.01,
    )
    model.eval()
    with torch.no_grad():
        out = run(val_pixels)
    acc = {k: float((out[k].argmax(-1) == val_targets[k]).float().mean()) for k in GLOBAL_TARGETS}
    acc["presence"] = float(((out["count"].argmax(-1) > 0) == (val_targets["count"] > 0)).float().mean())
    log.info(
        "tiny CLIP pretrained for %d steps; held-out accuracy %s",
        steps,
        ", ".join(f"{k} {v:.2f}" for k, v in acc.items()),
    )
    return acc
