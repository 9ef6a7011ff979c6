"""Region prompts (MedPLIB), the image side: point, box or free-form shape -> mask -> the vision input.

1. :func:`region_mask` rasterises every prompt kind to an (H, W) bool mask at the image's original
   resolution: a point becomes a small square, a box a filled rectangle, a free-form mask stays as it is.
2. :func:`region_inputs` carries the mask through the vision tower's image geometry (optional
   pad-to-square, resize, centre crop - the same steps as :class:`datamodules.images.ImageTransform`, with
   the transform's own resize filter) in one pass and gives the model's two views of it:

   - the mask at the vision INPUT resolution, (H_in, W_in) bool, pixel for pixel aligned with
     ``pixel_values`` (:func:`region_input_mask`): a pixel is in the region when the resized mask covers
     at least half of it - what MedPLIB's released pipeline gets by resizing the 0/1 uint8 mask (its
     ``ResizeLongestSide``) and rounding. The model's default "points" pooling samples the patch map at
     these pixels (``lightningmodules/models/region.py``);
   - the area-pooled G x G patch coverage in [0, 1] (:func:`region_grid_weights`): each patch's weight is
     the fraction of it the (soft, resized) region covers - what the "area" pooling option uses.

   The dataset does this per item (in the loader workers); the collator stacks the results into
   ``region_masks_input`` (R, H_in, W_in) bool and ``region_weights`` (R, G, G) float32 (2 KB a region:
   the soft coverage, so that "area" gives exactly the numbers it always gave; a bool mask cannot carry it).

Why soft coverage weights for "area": the weighted mean equals the mean, over the region's pixels, of the
feature of the patch each pixel falls in; a thresholded grid (``> 0``) would give a one-pixel sliver the
same weight as a fully covered patch.

A non-empty region that the centre crop cuts away entirely (or that the resize thins below half a pixel
everywhere) is put where it was nearest: the input mask gets the one pixel nearest to its centroid, the
grid weights weight 1 on the patch nearest to it (only when the crop leaves no coverage at all). An empty
mask (no pixel at all) gives an empty input mask and all-zero weights (the encoder's empty-region rule).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.images import ImageTransform

REGION_KINDS = ("point", "box", "mask")
POINT_FRACTION = 0.05  # a point's square side: 5% of the image's shorter side, at least 1 pixel

MaskLike = Any  # np.ndarray | torch.Tensor of shape (H, W)


# -- rasterising prompts --------------------------------------------------------------------------


def point_mask(x: float, y: float, *, height: int, width: int, fraction: float = POINT_FRACTION) -> torch.Tensor:
    """(H, W) bool: a square of side ``max(1, round(fraction * min(H, W)))`` centred on pixel (x, y).

    (x, y) are pixel coordinates (column, row); the square is clipped at the image border.
    """
    column, row = int(math.floor(x)), int(math.floor(y))
    if not (0 <= column < width and 0 <= row < height):
        raise ValueError(f"point ({x}, {y}) lies outside the {width}x{height} image")
    side = max(1, round(fraction * min(height, width)))
    top, left = row - side // 2, column - side // 2
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[max(0, top) : top + side, max(0, left) : left + side] = True
    return mask


def box_mask(box: tuple[float, float, float, float], *, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the filled pixel box (x, y, w, h) (the records' convention), clipped to the image.

    Columns floor(x) .. ceil(x + w) - 1 and rows likewise; a zero-size box still covers one pixel.
    """
    x, y, box_width, box_height = box
    left, top = int(math.floor(x)), int(math.floor(y))
    right = max(int(math.ceil(x + box_width)), left + 1)
    bottom = max(int(math.ceil(y + box_height)), top + 1)
    if right <= 0 or bottom <= 0 or left >= width or top >= height:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[max(0, top) : bottom, max(0, left) : right] = True
    return mask


def free_form_mask(mask: MaskLike, *, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """(H, W) bool as given (a non-bool mask: pixel >= 1 is foreground, the datasets' convention)."""
    array = torch.as_tensor(np.asarray(mask))
    array = array if array.dtype == torch.bool else array >= 1
    if array.dim() != 2:
        raise ValueError(f"a free-form region mask must be (H, W), got shape {tuple(array.shape)}")
    if (height, width) != (None, None) and tuple(array.shape) != (height, width):
        raise ValueError(f"region mask is {array.shape[1]}x{array.shape[0]} but the image is {width}x{height}")
    return array


def region_mask(
    kind: str,
    *,
    height: int,
    width: int,
    point: tuple[float, float] | None = None,
    box: tuple[float, float, float, float] | None = None,
    mask: MaskLike | None = None,
    point_fraction: float = POINT_FRACTION,
) -> torch.Tensor:
    """Any region prompt -> (H, W) bool mask: ``point`` (x, y), ``box`` (x, y, w, h) or ``mask``."""
    if kind == "point":
        if point is None:
            raise ValueError("region kind 'point' needs point=(x, y)")
        return point_mask(*point, height=height, width=width, fraction=point_fraction)
    if kind == "box":
        if box is None:
            raise ValueError("region kind 'box' needs box=(x, y, w, h)")
        return box_mask(box, height=height, width=width)
    if kind == "mask":
        if mask is None:
            raise ValueError("region kind 'mask' needs mask=(H, W) array")
        return free_form_mask(mask, height=height, width=width)
    raise ValueError(f"region kind must be one of {REGION_KINDS}, got {kind!r}")


# -- onto the vision input and its patch grid ----------------------------------------------------


def _through_image_geometry(
    mask: np.ndarray, transform: ImageTransform
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Apply an ``ImageTransform``'s pad / resize / crop to a float mask.

    Returns the (h_c, w_c) coverage in [0, 1] that the area pooling has always used (the crop clipped to the
    resized image), the same coverage placed exactly as the image's pixels are, (H_in, W_in) (a crop larger
    than the resized image is zero outside it, as PIL pads the image there), and the region's centroid
    (row, col) in crop coordinates (it may lie outside the crop).
    """
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    if transform.pad_square and image.width != image.height:
        side = max(image.width, image.height)
        canvas = Image.new("F", (side, side), 0.0)  # the region is absent from the padding
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))  # as pad_to_square
        image = canvas
    image = transform.resize(image)  # the transform's own size rule and filter
    resized = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)  # (h_r, w_r); bicubic may overshoot
    top = left = 0
    crop = transform.crop_size
    if transform.do_center_crop and crop:
        crop_height, crop_width = int(crop["height"]), int(crop["width"])
        top, left = (resized.shape[0] - crop_height) // 2, (resized.shape[1] - crop_width) // 2  # floor, as HF
        cropped = resized[max(0, top) : top + crop_height, max(0, left) : left + crop_width]  # (h_c, w_c)
        placed = np.zeros((crop_height, crop_width), np.float32)  # (H_in, W_in)
        placed[max(0, -top) : max(0, -top) + cropped.shape[0], max(0, -left) : max(0, -left) + cropped.shape[1]] = (
            cropped
        )
    else:
        cropped = placed = resized
    total = resized.sum()
    rows, cols = np.indices(resized.shape)
    centroid = (
        ((rows * resized).sum() / total - top, (cols * resized).sum() / total - left) if total > 0 else (0.0, 0.0)
    )
    return cropped, placed, centroid


def _nearest_cell(centroid: tuple[float, float], shape: tuple[int, int], cells: int | None = None) -> tuple[int, int]:
    """The (row, col) of the pixel (``cells`` None) or of the ``cells`` x ``cells`` patch nearest to ``centroid``."""
    height, width = shape
    rows, cols = (height, width) if cells is None else (cells, cells)
    row = min(max(int(centroid[0] * rows / height), 0), rows - 1)
    col = min(max(int(centroid[1] * cols / width), 0), cols - 1)
    return row, col


def region_inputs(
    mask: MaskLike, *, grid_size: int, image_transform: ImageTransform | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) region mask at the original resolution -> (H_in, W_in) bool input mask, (G, G) float32 coverage.

    ``image_transform`` is the vision tower's ``ImageTransform`` (so the mask lands where the image content
    does); None means the mask is already aligned with the (square) vision input. One pass of the image
    geometry gives both (:func:`region_input_mask`, :func:`region_grid_weights`).
    """
    original = free_form_mask(mask)  # (H, W) bool
    array = original.numpy().astype(np.float32)  # (H, W)
    if image_transform is not None:
        area, placed, centroid = _through_image_geometry(array, image_transform)  # (h_c, w_c), (H_in, W_in)
    else:
        rows, cols = np.nonzero(array)
        centroid = (rows.mean(), cols.mean()) if rows.size else (0.0, 0.0)
        area = placed = array
    present = bool(original.any())
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(area))[None, None], grid_size)[
        0, 0
    ]  # (G, G)
    if coverage.sum() <= 0 and present:
        coverage[_nearest_cell(centroid, area.shape, grid_size)] = 1.0
    inside = torch.from_numpy(np.ascontiguousarray(placed >= 0.5))  # (H_in, W_in) bool
    if present and not bool(inside.any()):
        inside[_nearest_cell(centroid, placed.shape)] = True
    return inside, coverage


def region_input_mask(mask: MaskLike, *, image_transform: ImageTransform | None = None) -> torch.Tensor:
    """(H, W) region mask at the original resolution -> (H_in, W_in) bool, aligned with the vision input.

    A pixel belongs to the region when the resized mask covers at least half of it; a non-empty region that
    the crop (or the resize) leaves without such a pixel keeps the one pixel nearest to its centroid.
    """
    return region_inputs(mask, grid_size=1, image_transform=image_transform)[0]


def region_grid_weights(
    mask: MaskLike, *, grid_size: int, image_transform: ImageTransform | None = None
) -> torch.Tensor:
    """(H, W) region mask at the original resolution -> (G, G) float32 patch coverage in [0, 1].

    ``image_transform`` is the vision tower's ``ImageTransform`` (so the mask lands where the image
    content does); None means the mask is already aligned with the (square) vision input. A non-empty
    region that the crop removes entirely gets weight 1 on the patch nearest to its centroid.
    """
    return region_inputs(mask, grid_size=grid_size, image_transform=image_transform)[1]
