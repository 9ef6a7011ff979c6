"""Region prompts: rasterisation, the vision-grid weights, "area" pooling by hand, splicing (the default
"points" pooling: tests/medplib/test_region_points.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.regions import box_mask, point_mask, region_grid_weights, region_mask
from lightningmodules.models.region import RegionEncoder, splice_region_tokens


def _rows_cols(mask: torch.Tensor) -> tuple[list[int], list[int]]:
    return mask.any(dim=1).nonzero().flatten().tolist(), mask.any(dim=0).nonzero().flatten().tolist()


def test_point_becomes_a_small_square() -> None:
    mask = region_mask("point", height=100, width=200, point=(10, 20))  # side 5% of 100 = 5
    assert mask.dtype == torch.bool and mask.shape == (100, 200)
    assert _rows_cols(mask) == (list(range(18, 23)), list(range(8, 13))) and int(mask.sum()) == 25
    corner = point_mask(0, 0, height=100, width=200)  # clipped at the border
    assert _rows_cols(corner) == ([0, 1, 2], [0, 1, 2])
    tiny = point_mask(3.7, 1.2, height=8, width=8)  # 5% of 8 rounds to 0 -> at least one pixel
    assert int(tiny.sum()) == 1 and bool(tiny[1, 3])
    with pytest.raises(ValueError, match="outside"):
        point_mask(200, 5, height=100, width=200)


def test_box_becomes_a_filled_rectangle() -> None:
    mask = region_mask("box", height=10, width=12, box=(2.5, 3, 4, 2))  # (x, y, w, h)
    assert _rows_cols(mask) == ([3, 4], [2, 3, 4, 5, 6]) and int(mask.sum()) == 10
    clipped = box_mask((8, 8, 10, 10), height=10, width=12)
    assert _rows_cols(clipped) == ([8, 9], [8, 9, 10, 11])
    assert int(box_mask((4, 4, 0, 0), height=10, width=12).sum()) == 1


def test_free_form_mask_stays_as_it_is() -> None:
    drawn = np.zeros((6, 7), np.uint8)
    drawn[1, 2] = drawn[4, 5] = 255
    mask = region_mask("mask", height=6, width=7, mask=drawn)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(drawn >= 1))
    with pytest.raises(ValueError, match="image is"):
        region_mask("mask", height=7, width=7, mask=drawn)
    with pytest.raises(ValueError, match="kind"):
        region_mask("polygon", height=6, width=7)


def test_area_region_pooling_equals_hand_computation() -> None:
    encoder = RegionEncoder(vision_hidden_size=3, llm_hidden_size=2, grid_size=2, pooling="area")
    with torch.no_grad():
        encoder.adapter.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
        encoder.adapter.bias.copy_(torch.tensor([0.5, -0.5]))
    features = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]])  # (1, 4, 3)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)  # 4x4 pixels on a 2x2 grid of 2x2-pixel patches
    mask[0, 0:2, 0:2] = True  # patch (0, 0) fully covered
    mask[0, 0:2, 2] = True  # patch (0, 1) half covered
    # coverage (1, 0.5, 0, 0) -> weights (2/3, 1/3, 0, 0)
    pooled = torch.tensor([2 / 3 * 1 + 1 / 3 * 4, 2 / 3 * 2 + 1 / 3 * 5, 2 / 3 * 3 + 1 / 3 * 6])  # (2, 3, 4)
    expected = torch.tensor([pooled[0] + 2 * pooled[2] + 0.5, pooled[1] - pooled[2] - 0.5])
    torch.testing.assert_close(encoder(features, mask)[0], expected)
    coverage = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # the same region given on the grid
    torch.testing.assert_close(encoder(features, coverage)[0], expected)
    assert encoder.empty_region_count == 0


def test_area_empty_region_pools_the_whole_image() -> None:
    encoder = RegionEncoder(vision_hidden_size=3, llm_hidden_size=3, grid_size=2, pooling="area")
    with torch.no_grad():
        encoder.adapter.weight.copy_(torch.eye(3))
        encoder.adapter.bias.zero_()
    features = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    out = encoder(features.expand(2, 4, 3), torch.zeros(2, 2, 2))
    torch.testing.assert_close(out, features.mean(dim=1).expand(2, 3))
    assert encoder.empty_region_count == 2


def test_grid_weights_follow_the_vision_transform() -> None:
    from datamodules.images import ImageTransform

    transform = ImageTransform(
        size={"shortest_edge": 8},
        crop_size={"height": 8, "width": 8},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resample=2,
    )
    # a 100x50 (H x W) image becomes 16x8, centre-cropped to rows 4..11: the top quarter is cut away
    middle = np.zeros((100, 50), bool)
    middle[20:80] = True  # covers the kept rows 25..74 (with a margin for the resize filter)
    torch.testing.assert_close(
        region_grid_weights(middle, grid_size=2, image_transform=transform), torch.ones(2, 2), atol=0.02, rtol=0
    )
    top = np.zeros((100, 50), bool)
    top[0:10, 0:10] = True  # cropped away entirely -> the nearest patch: top row, left column
    weights = region_grid_weights(top, grid_size=2, image_transform=transform)
    assert weights.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # pad-to-square: the image sits in the middle columns, the padding never belongs to a region
    padded = ImageTransform(
        size={"shortest_edge": 40},
        crop_size={"height": 40, "width": 40},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resample=2,
        pad_square=True,
    )
    weights = region_grid_weights(np.ones((100, 50), bool), grid_size=4, image_transform=padded)
    torch.testing.assert_close(weights[:, 1:3], torch.ones(4, 2), atol=0.05, rtol=0)  # the filter blurs edges
    torch.testing.assert_close(weights[:, [0, 3]], torch.zeros(4, 2), atol=0.05, rtol=0)
    # no transform: the mask is already aligned with the vision input
    aligned = np.zeros((8, 8), bool)
    aligned[:4, :2] = True
    assert region_grid_weights(aligned, grid_size=2).tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_splice_region_tokens_in_reading_order() -> None:
    placeholder = 9
    input_ids = torch.tensor([[1, 5, placeholder, 6, 2], [1, 5, placeholder, 6, placeholder]])  # (B, T)
    embeds = torch.zeros(2, 5, 2)
    tokens = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])  # (R, D)
    out = splice_region_tokens(embeds, input_ids, tokens, placeholder_id=placeholder)
    assert out[0, 2].tolist() == [1.0, 1.0] and out[1, 2].tolist() == [2.0, 2.0] and out[1, 4].tolist() == [3.0, 3.0]
    assert float(out.sum()) == 12.0
    with pytest.raises(ValueError, match="placeholders"):
        splice_region_tokens(embeds, input_ids, tokens[:2], placeholder_id=placeholder)
