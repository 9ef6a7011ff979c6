"""timm vision towers (EVA-CLIP ViT-g/14 for Uni-Med): the optional-extra error and the wrapper's plumbing.

timm is not a test dependency, so the wrapper is checked against a stand-in module with timm's
``create_model`` / ``forward_intermediates`` interface (the EVA / ViT one: prefix tokens returned apart).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lightningmodules.models.vision import VisionTower
from lightningmodules.models.vision_timm import (
    INSTALL_HINT,
    TimmVisionEncoder,
    load_timm_vision,
    timm_transform_settings,
)


class FakeViT(nn.Module):
    """Block b adds b + 1 to every token, so the selected block's output is recognisable."""

    def __init__(self, depth: int = 4, dim: int = 6, img: int = 32, patch: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))
        self.scale = nn.Parameter(torch.ones(()))  # towers have weights (the dtype comes from them)
        self.embed_dim = dim
        self.num_prefix_tokens = 1
        self.patch_embed = types.SimpleNamespace(img_size=(img, img), patch_size=(patch, patch))
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
        self.calls: list[dict] = []

    def forward_intermediates(
        self, x, *, indices, norm, stop_early, output_fmt, intermediates_only, return_prefix_tokens
    ):
        self.calls.append({"indices": indices, "output_fmt": output_fmt, "prefix": return_prefix_tokens})
        n, grid = x.shape[0], self.patch_embed.img_size[0] // self.patch_embed.patch_size[0]
        out = []
        for b in indices:
            patches = torch.full((n, grid * grid, self.embed_dim), float(b + 1))  # (N, P, D)
            prefix = torch.full((n, 1, self.embed_dim), -1.0)  # (N, 1, D): the CLS token
            out.append((patches, prefix))
        return out


def test_missing_timm_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "eva_vit_g.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match=r"medpipe\[timm\]"):
        load_timm_vision("timm:eva_giant_patch14_clip_224", checkpoint=weights)
    assert "pip install" in INSTALL_HINT


def test_checkpoint_is_required_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.vision.checkpoint"):
        load_timm_vision("timm:eva_giant_patch14_clip_224", checkpoint=None)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_timm_vision("timm:eva_giant_patch14_clip_224", checkpoint=tmp_path / "missing.pth")


def test_local_weights_only_and_the_tower_drops_cls(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "eva_vit_g.pth"
    weights.write_bytes(b"")
    created: list[dict] = []
    fake = types.ModuleType("timm")

    def create_model(name, **kwargs):
        created.append({"name": name, **kwargs})
        return FakeViT()

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    encoder = load_timm_vision("timm:eva_giant_patch14_clip_224", checkpoint=weights, select_layer=-2)
    assert created == [
        {
            "name": "eva_giant_patch14_clip_224",
            "pretrained": True,
            "num_classes": 0,
            "pretrained_cfg_overlay": {"file": str(weights)},
        }
    ]
    tower = VisionTower(encoder=encoder, select_layer=-2, select_feature="patch")
    assert (tower.hidden_size, tower.grid_size, tower.num_tokens) == (6, 4, 16)
    features = tower(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 16, 6)  # CLS dropped
    # HF's hidden_states[-2] of 4 blocks = output of block index 2 (the second to last block)
    assert encoder.model.calls[-1]["indices"] == [2] and torch.all(features == 3.0)
    with_cls = VisionTower(encoder=encoder, select_layer=-2, select_feature="cls_patch")(torch.zeros(1, 3, 32, 32))
    assert with_cls.shape == (1, 17, 6) and torch.all(with_cls[:, 0] == -1.0)
    settings = timm_transform_settings(encoder)
    assert settings["image_mean"] == (0.5, 0.5, 0.5) and settings["crop_size"] == {"height": 32, "width": 32}


def test_layer_selection_matches_hf_indexing() -> None:
    assert TimmVisionEncoder(FakeViT(depth=40), select_layer=-2).block == 38  # BLIP-2's 39-block EVA-g
    assert TimmVisionEncoder(FakeViT(depth=40), select_layer=-1).block == 39
    assert TimmVisionEncoder(FakeViT(depth=40), select_layer=5).block == 4
    with pytest.raises(ValueError, match="embedding output"):
        TimmVisionEncoder(FakeViT(depth=40), select_layer=0)
