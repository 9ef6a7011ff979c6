"""Helpers shared by the importer tests: tokenizer files, a random CLIP tower, an image, our logits."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)


def random_clip(clip_dir: Path, seed: int):
    """The tiny CLIP tower's architecture with fresh random weights (not the folder's)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig.from_pretrained(clip_dir)).eval()


def image(seed: int = 5) -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # (1, 3, H, W)


def ours_logits(built, prefix: list[int], suffix: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """Our model's logits for prefix + the image's placeholder tokens + suffix: (T, V)."""
    model = built.model.eval()
    ids = torch.tensor([prefix + [model.image_token_id] * model.num_image_tokens + suffix])  # (1, T)
    with torch.no_grad():
        hidden = model(ids, torch.ones_like(ids), pixel_values=pixels).hidden_states  # (1, T, D)
        return model.output_logits(hidden)[0]  # (T, V)
