"""``tiny:sam`` (random, 64 px) and ``tiny:medsam`` (128 px, pretrained on phantom masks): tiny SAMs in the real
checkpoint layout for the MedPLIB grounding head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.zoo.pretrain import pretrain

SAM_IMAGE_SIZE = 64
SAM_PATCH = 8


def build_sam(out: Path, _cache: Path, width: int = 32, image_size: int = SAM_IMAGE_SIZE) -> None:
    """Tiny SAM (random weights) in the real checkpoint layout: 64 px input, 8x8 embedding grid,
    32-d prompts, 32x32 low-res masks, plus the SAM image processor config (ImageNet mean/std)."""
    from transformers import SamConfig, SamModel
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(0)
    grid = image_size // SAM_PATCH
    config = SamConfig(
        vision_config=dict(
            hidden_size=width,
            output_channels=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=SAM_PATCH,
            mlp_dim=64,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=width // 2,  # 2 * num_pos_feats = prompt dim
            initializer_range=0.02,
        ),  # SamVisionConfig's 1e-10 would give constant features
        prompt_encoder_config=dict(
            hidden_size=width, image_size=image_size, patch_size=SAM_PATCH, mask_input_channels=8
        ),
        mask_decoder_config=dict(
            hidden_size=width, mlp_dim=2 * width, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=width
        ),
    )
    SamModel(config).save_pretrained(out)
    SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": 4 * grid},
        mask_pad_size={"height": 4 * grid, "width": 4 * grid},
    ).save_pretrained(out)


def pretrain_sam(
    model: nn.Module, *, steps: int, batch_size: int = 16, seed: int = 0, peak_lr: float = 3e-3, n_images: int = 600
) -> float:
    """Promptable segmentation on phantom masks (lesions and organs) from box and point prompts, all
    parts training: stands in for SAM / SAM-Med2D pretraining, so the frozen image encoder of the tiny
    grounding runs has features that separate lesions from tissue. Returns the final running mean Dice."""
    from datamodules.images import sam_preprocess
    from datamodules.synthetic.phantoms import make_phantom

    size = model.config.vision_config.image_size
    low_res = 4 * model.config.prompt_encoder_config.image_embedding_size
    pixels, targets, boxes, points = [], [], [], []
    for i in range(n_images):
        p = make_phantom(i, seed=seed + 7000, size=128)
        candidates = ([p.lesion_mask] if p.lesion_mask is not None else []) * 2 + [
            m for m in p.organ_masks.values() if m.any()
        ]
        mask = candidates[i % len(candidates)]
        pixels.append(sam_preprocess(np.stack([p.image] * 3, axis=-1), image_size=size)[0])
        target = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, 128, 128)
        targets.append(F.interpolate(target, size=(low_res, low_res), mode="area")[0, 0])  # (m, m)
        ys, xs = np.nonzero(mask)
        scale = size / 128.0
        boxes.append([xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale, (ys.max() + 1) * scale])
        k = len(xs) // 2
        points.append([xs[k] * scale + 0.5, ys[k] * scale + 0.5])
    pixels, targets = torch.stack(pixels), torch.stack(targets)  # (N, 3, S, S), (N, m, m)
    boxes = torch.tensor(boxes, dtype=torch.float32)  # (N, 4)
    points = torch.tensor(points, dtype=torch.float32)  # (N, 2)
    batch_dice: list[float] = []

    def batch_loss(idx: torch.Tensor, step: int) -> torch.Tensor:
        if step % 2 == 0:  # box and point prompts alternate
            prompt = {"input_boxes": boxes[idx][:, None]}  # (b, 1, 4)
        else:
            prompt = {
                "input_points": points[idx][:, None, None],  # (b, 1, 1, 2)
                "input_labels": torch.ones(batch_size, 1, 1, dtype=torch.long),
            }
        out = model(pixel_values=pixels[idx], multimask_output=False, **prompt)
        logits = out.pred_masks[:, 0, 0]  # (b, m, m)
        target = targets[idx]  # (b, m, m)
        prob = torch.sigmoid(logits)
        dice_terms = 1 - (2 * (prob * target).sum((1, 2)) + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)  # (b,)
        batch_dice.append(float(1 - dice_terms.detach().mean()))
        return F.binary_cross_entropy_with_logits(logits, target) + dice_terms.mean()

    model.train()
    pretrain(
        model.parameters(),
        batch_loss,
        steps=steps,
        n_items=len(pixels),
        batch_size=batch_size,
        peak_lr=peak_lr,
        seed=seed,
        max_grad_norm=1.0,
    )
    model.eval()
    dice = 0.0
    for step, value in enumerate(batch_dice):
        dice = 0.9 * dice + 0.1 * value if step else value
    return dice


def build_medsam(out: Path, _cache: Path, pretrain_steps: int = 1600) -> None:
    """``tiny:medsam``: a tiny SAM (128 px input, 16x16 grid) pretrained on phantom masks (:func:`pretrain_sam`,
    a phantom stream disjoint from the synthetic datasets'); it stands in for SAM-Med2D (trained on
    SA-Med2D-20M) in the MedPLIB recipe's tiny runs. ``tiny:sam`` (64 px) stays random. 1600 steps (~1 min): with
    400 (final running Dice 0.30) the tiny grounding run's test mDice sat at 0.58-0.62 whatever its own length;
    with 1600 (Dice 0.53) it reaches 0.74."""
    from transformers import SamModel

    build_sam(out, _cache, image_size=2 * SAM_IMAGE_SIZE)  # 128 px: the phantoms' own size, 64x64 masks
    torch.manual_seed(0)
    model = SamModel.from_pretrained(out)
    dice = pretrain_sam(model, steps=pretrain_steps)  # on BUILD_THREADS, like every build
    model.save_pretrained(out)
    (out / "pretraining.txt").write_text(
        f"promptable phantom segmentation, {pretrain_steps} steps, final running Dice {dice:.3f}\n"
    )
