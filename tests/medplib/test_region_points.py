"""MedPLIB's region token as the released code computes it ("points" pooling) and the "area" option.

The hand computations below use the released convention: a mask at the vision input resolution is
nearest-resized to the G x G patch grid as cv2's INTER_NEAREST does (``cv2_nearest``), then cell (row, col)
sits at grid position (row / G * (G - 1), col / G * (G - 1)) of the patch map (``nonzero() / (G, G)``,
then ``2 p - 1`` and ``grid_sample(align_corners=True)``), and a bilinear sample there is written out with
the four neighbouring patches - never by calling ``grid_sample`` on the encoder's own coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medplib_helpers import batch_of, tiny_cfg

from datamodules.images import ImageTransform
from datamodules.regions import region_grid_weights, region_input_mask, region_inputs
from lightningmodules.models.region import RegionEncoder

# -- hand computations ----------------------------------------------------------------------------


def bilinear(feature_map: np.ndarray, row: float, col: float) -> np.ndarray:
    """(G, G, D) map sampled at grid position (row, col) with the four neighbouring patches."""
    grid = feature_map.shape[0]
    r0, c0 = math.floor(row), math.floor(col)
    r1, c1 = min(r0 + 1, grid - 1), min(c0 + 1, grid - 1)
    fr, fc = row - r0, col - c0
    return (
        (1 - fr) * (1 - fc) * feature_map[r0, c0]
        + (1 - fr) * fc * feature_map[r0, c1]
        + fr * (1 - fc) * feature_map[r1, c0]
        + fr * fc * feature_map[r1, c1]
    )


def cv2_nearest(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """(..., H, W) -> (..., G, G) as cv2.resize(INTER_NEAREST) makes it: cell i takes pixel floor(i * H / G)."""
    height, width = masks.shape[-2:]
    rows = [math.floor(i * height / grid) for i in range(grid)]
    cols = [math.floor(j * width / grid) for j in range(grid)]
    return masks[..., rows, :][..., cols]


def hand_token(features: torch.Tensor, pixels: list[tuple[int, int]], shape: tuple[int, int], encoder) -> np.ndarray:
    """features (G*G, D): the adapted mean of the bilinear samples at ``pixels`` of an (H, W) mask, float64."""
    grid = encoder.grid_size
    weight = encoder.adapter.weight.detach().double().numpy()  # (d_llm, D)
    bias = encoder.adapter.bias.detach().double().numpy()  # (d_llm,)
    if not pixels:
        return np.zeros(weight.shape[0])
    feature_map = features.detach().double().numpy().reshape(grid, grid, -1)  # (G, G, D)
    height, width = shape
    samples = [bilinear(feature_map, r / height * (grid - 1), c / width * (grid - 1)) for r, c in pixels]
    return weight @ np.mean(samples, axis=0) + bias


def released_tokens(features: torch.Tensor, masks: torch.Tensor, encoder) -> torch.Tensor:
    """MedPLIB's order: the adapter on the whole patch map, then the samples of the adapted map, then the mean
    (an empty mask: the mean over nothing is NaN, which becomes 0)."""
    grid = encoder.grid_size
    adapted = encoder.adapter(features)  # (R, G*G, d_llm)
    tokens = []
    for feature_map, mask in zip(adapted, masks, strict=True):
        height, width = mask.shape
        where = mask.nonzero().float() / torch.tensor([height, width], dtype=torch.float32)  # (N, 2): (row, col)
        coords = (2 * where.flip(-1) - 1)[None, :, None, :]  # (1, N, 1, 2): (x, y) in [-1, 1]
        image = feature_map.reshape(grid, grid, -1).permute(2, 0, 1)[None]  # (1, d_llm, G, G)
        if where.shape[0] == 0:
            tokens.append(torch.full((image.shape[1],), float("nan")).nan_to_num())
            continue
        samples = F.grid_sample(image, coords, mode="bilinear", align_corners=True)[0, :, :, 0]  # (d_llm, N)
        tokens.append(samples.mean(dim=1).nan_to_num())
    return torch.stack(tokens)  # (R, d_llm)


def encoder_with(grid: int, dim: int, llm: int, **kwargs) -> RegionEncoder:
    torch.manual_seed(0)
    encoder = RegionEncoder(vision_hidden_size=dim, llm_hidden_size=llm, grid_size=grid, **kwargs)
    with torch.no_grad():
        encoder.adapter.bias.uniform_(0.5, 1.0)  # a bias far from 0: an empty region must not give it
    return encoder


# -- the token ------------------------------------------------------------------------------------


def test_point_token_equals_the_hand_computation() -> None:
    encoder = RegionEncoder(vision_hidden_size=2, llm_hidden_size=2, grid_size=3)
    with torch.no_grad():
        encoder.adapter.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        encoder.adapter.bias.copy_(torch.tensor([0.5, -0.5]))
    # patch (i, j) of the 3x3 map has features (3 i + j, 10)
    features = torch.tensor([[3.0 * i + j, 10.0] for i in range(3) for j in range(3)])[None]  # (1, 9, 2)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)  # a grid mask: cell (r, c) -> map position (2 r / 3, 2 c / 3)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 1] = True
    # (0, 0) -> patch (0, 0): 0
    # (1, 1) -> (2/3, 2/3): 1/9 * 0 + 2/9 * 1 + 2/9 * 3 + 4/9 * 4 = 24/9
    # (2, 1) -> (4/3, 2/3): 2/9 * 3 + 4/9 * 4 + 1/9 * 6 + 2/9 * 7 = 42/9
    mean = torch.tensor([(0 + 24 / 9 + 42 / 9) / 3, 10.0])  # (2,)
    expected = torch.tensor([mean[0] + 0.5, mean[0] - mean[1] - 0.5])
    torch.testing.assert_close(encoder(features, mask)[0], expected)
    # an 8x8 input mask on a 4x4 map: first the nearest resize to the grid (cells take pixels 0, 2, 4, 6)
    encoder = encoder_with(4, 3, 5)
    features = torch.randn(2, 16, 3)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    pixels = [[(0, 0), (6, 6), (2, 4), (4, 2), (5, 5)], [(2, 6), (4, 4), (3, 3)]]  # odd pixels fall between cells
    for r, region in enumerate(pixels):
        for row, col in region:
            masks[r, row, col] = True
    cells = [[(0, 0), (1, 2), (2, 1), (3, 3)], [(1, 3), (2, 2)]]  # the even pixels, halved, row-major
    out = encoder(features, masks)  # (2, 5)
    for r, region in enumerate(cells):
        np.testing.assert_allclose(out[r].detach().numpy(), hand_token(features[r], region, (4, 4), encoder), atol=1e-5)
    assert encoder.empty_region_count == 0


def test_released_order_adapter_first_equals_ours() -> None:
    encoder = encoder_with(4, 6, 5)
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(4, 16, 6, generator=generator)  # (R, G*G, D)
    masks = torch.rand(4, 16, 16, generator=generator) < 0.3  # (R, H, W): at most 256 pixels, no subset drawn
    masks[2] = False  # an empty region
    masks[3] = False
    masks[3, 12, 12] = True  # the last cell: grid position (3/4 * 3, 3/4 * 3), inside the map
    with torch.no_grad():
        ours = encoder(features, masks)
        released = released_tokens(features, cv2_nearest(masks, 4), encoder)  # its dataset resizes, then samples
    torch.testing.assert_close(ours, released, atol=1e-6, rtol=1e-6)
    assert ours[2].abs().max() == 0 and encoder.empty_region_count == 1


def test_at_most_max_points_are_sampled_and_evaluation_is_deterministic(monkeypatch) -> None:
    encoder = encoder_with(24, 3, 2)  # CLIP-336's 24 x 24 grid: up to 576 cells
    features = torch.randn(2, 576, 3)
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[0, :, :] = True  # 576 cells: 512 drawn
    masks[1].view(-1)[:512] = True  # exactly 512: every cell, nothing drawn
    sampled: list[int] = []
    sample_points = encoder.sample_points

    def spy(mask: torch.Tensor) -> torch.Tensor:
        points = sample_points(mask)
        sampled.append(points.shape[0])
        return points

    monkeypatch.setattr(encoder, "sample_points", spy)
    encoder.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        first = encoder(features, masks)
        torch.manual_seed(2)  # evaluation draws with its own seeded generator, not the global RNG
        second = encoder(features, masks)
        alone = encoder(features[:1], masks[:1])  # a region's token does not depend on its batch
    assert sampled == [512, 512, 512, 512, 512]  # two batches of two, then one region
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(alone[0], first[0], atol=0, rtol=0)
    # the documented subset: the first 512 of randperm(576) with a generator seeded with eval_seed (0)
    pixels = masks[0].nonzero()  # (576, 2), row-major
    keep = torch.randperm(576, generator=torch.Generator().manual_seed(encoder.eval_seed))[:512]
    chosen = [tuple(p) for p in pixels[keep].tolist()]
    np.testing.assert_allclose(first[0].numpy(), hand_token(features[0], chosen, (24, 24), encoder), atol=1e-5)
    every = [tuple(p) for p in masks[1].nonzero().tolist()]
    np.testing.assert_allclose(first[1].numpy(), hand_token(features[1], every, (24, 24), encoder), atol=1e-5)
    # training: the global torch RNG, as released
    encoder.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = encoder(features, masks)
        torch.manual_seed(1)
        b = encoder(features, masks)
        torch.manual_seed(2)
        c = encoder(features, masks)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # only the 576-cell region draws


def test_empty_region_gives_zeros_and_keeps_the_adapter_in_the_graph() -> None:
    encoder = encoder_with(3, 2, 4)
    features = torch.randn(2, 9, 2)
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    tokens = encoder(features, masks)
    assert torch.equal(tokens, torch.zeros(2, 4)) and encoder.empty_region_count == 2  # zeros, not the bias
    tokens.sum().backward()
    assert encoder.adapter.weight.grad is not None and encoder.adapter.weight.grad.abs().sum() == 0
    masks[1, 2, 2] = True
    torch.testing.assert_close(encoder(features, masks)[0], torch.zeros(4))
    assert encoder.empty_region_count == 3


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="pooling"):
        RegionEncoder(vision_hidden_size=2, llm_hidden_size=2, grid_size=2, pooling="mean")
    with pytest.raises(ValueError, match="max_points"):
        RegionEncoder(vision_hidden_size=2, llm_hidden_size=2, grid_size=2, max_points=0)


def test_config_choices(tmp_path) -> None:
    from pipeline.config import ConfigError

    cfg = tiny_cfg(tmp_path)
    assert cfg.model.grounding.region_pooling == "points" and cfg.model.grounding.region_max_points == 512
    with pytest.raises(ConfigError, match="region_pooling"):
        tiny_cfg(tmp_path, "model.grounding.region_pooling=mean")
    with pytest.raises(ConfigError, match=r"region_max_points.*> 0"):
        tiny_cfg(tmp_path, "model.grounding.region_max_points=0")
    assert tiny_cfg(tmp_path, "model.grounding.region_pooling=area").model.grounding.region_pooling == "area"


# -- the "area" option: today's numbers -----------------------------------------------------------


def test_area_option_pools_the_weights_as_before() -> None:
    encoder = encoder_with(2, 3, 2, pooling="area")
    features = torch.randn(1, 4, 3)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0:2, 0:2] = True
    mask[0, 0:2, 2] = True  # coverage (1, 0.5, 0, 0)
    weights = torch.tensor([1.0, 0.5, 0.0, 0.0]) / 1.5
    expected = encoder.adapter(weights @ features[0])
    torch.testing.assert_close(encoder(features, mask)[0], expected)
    torch.testing.assert_close(encoder(features, torch.tensor([[[1.0, 0.5], [0.0, 0.0]]]))[0], expected)


# -- the data side: the mask at the vision input resolution -----------------------------------------


def test_input_mask_is_aligned_with_the_image_pixels() -> None:
    from PIL import Image

    transform = ImageTransform(
        size={"shortest_edge": 24},
        crop_size={"height": 20, "width": 20},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resample=0,  # nearest: the image's own pixels say exactly which input pixels are the region
        pad_square=True,
    )
    mask = np.zeros((60, 90), bool)
    mask[10:40, 20:50] = True
    mask[50:58, 80:88] = True
    image = Image.fromarray(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))
    pixels = transform(image)  # (3, 20, 20): white region, black image, grey padding
    inside = region_input_mask(mask, image_transform=transform)
    assert inside.dtype == torch.bool and inside.shape == (20, 20)
    assert torch.equal(inside, pixels[0] > 0.5)
    both, weights = region_inputs(mask, grid_size=4, image_transform=transform)
    assert torch.equal(both, inside)
    assert torch.equal(weights, region_grid_weights(mask, grid_size=4, image_transform=transform))


def test_cropped_away_and_empty_regions_on_the_input() -> None:
    transform = ImageTransform(
        size={"shortest_edge": 8},
        crop_size={"height": 8, "width": 8},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        resample=2,
    )
    top = np.zeros((100, 50), bool)
    top[0:10, 0:10] = True  # a 100x50 image becomes 16x8, crop rows 4..11: the region is cut away
    inside, weights = region_inputs(top, grid_size=2, image_transform=transform)
    assert inside.nonzero().tolist() == [[0, 0]]  # the input pixel nearest to where it was
    assert weights.tolist() == [[1.0, 0.0], [0.0, 0.0]]  # the same patch, as before
    empty, weights = region_inputs(np.zeros((100, 50), bool), grid_size=2, image_transform=transform)
    assert not empty.any() and not weights.any()


# -- the tiny MedPLIB model ---------------------------------------------------------------------------


def test_collator_hands_the_input_masks(grounded) -> None:
    _, built, dm = grounded
    batch = batch_of(dm, "train", lambda r: r.task == "region", n=2)
    masks = batch["region_masks_input"]
    assert masks.dtype == torch.bool and masks.shape == (2, *built.transform.output_size)
    expected = [region_input_mask(m, image_transform=built.transform) for m in batch["region_masks"]]
    assert torch.equal(masks, torch.stack(expected))
    assert batch["region_weights"].shape == (2, built.model.region.grid_size, built.model.region.grid_size)


def test_tiny_medplib_forward_uses_the_point_tokens(grounded) -> None:
    from lightningmodules.grounding_module import grounded_inputs

    _, built, dm = grounded
    model = built.model
    assert model.region.pooling == "points" and model.region.max_points == 512
    batch = batch_of(dm, "train", lambda r: r.task == "region", n=2)
    model.eval()
    with torch.no_grad():
        embeds = model.embed(
            batch["input_ids"],
            batch["pixel_values"],
            batch["image_task_ids"],
            region_masks_input=batch["region_masks_input"],
            region_weights=batch["region_weights"],
            region_batch_index=batch["region_batch_index"],
        )
        features = model.vision(batch["pixel_values"])  # (2, G*G, D_vision)
    positions = (batch["input_ids"] == model.region_token_id).nonzero()  # one placeholder per sample
    assert positions[:, 0].tolist() == [0, 1]
    for b, t in positions.tolist():
        mask = cv2_nearest(batch["region_masks_input"][b], model.region.grid_size)  # (H_in, W_in) -> (G, G)
        pixels = mask.nonzero()  # (N, 2)
        if pixels.shape[0] > 512:
            pixels = pixels[torch.randperm(pixels.shape[0], generator=torch.Generator().manual_seed(0))[:512]]
        by_hand = hand_token(features[b], [tuple(p) for p in pixels.tolist()], tuple(mask.shape), model.region)
        np.testing.assert_allclose(embeds[b, t].numpy(), by_hand, atol=1e-4, rtol=1e-4)
    # a training forward through the grounded module's inputs runs and trains the adapter
    model.train()
    model.zero_grad()
    out = model(**grounded_inputs(batch))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.region.adapter.weight.grad is not None and model.region.adapter.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
