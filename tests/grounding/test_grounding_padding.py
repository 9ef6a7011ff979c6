"""SAM's resize / pad and the inverse crop for non-square images, checked on hand-set decoder outputs."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.images import sam_preprocess, sam_resized_shape
from lightningmodules.models.grounding import GroundingHead, postprocess_mask

HIGH, LOW = 10.0, -10.0


def _low_res_box(rows: tuple[int, int], cols: tuple[int, int], size: int = 32) -> torch.Tensor:
    """(size, size) logits: HIGH inside [rows) x [cols), LOW elsewhere."""
    logits = torch.full((size, size), LOW)
    logits[rows[0] : rows[1], cols[0] : cols[1]] = HIGH
    return logits


def _positive_span(logits: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Half-open row and column ranges of the positive logits, checked to be one solid box.

    Bilinear resizing rounds a box's corners off (a 2-D step interpolates twice), so the box is read
    from the middle row and the middle column of the positive region.
    """
    positive = logits > 0
    rows = positive.any(dim=1).nonzero().flatten()
    cols = positive.any(dim=0).nonzero().flatten()
    row_span, col_span = (int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1)
    middle_row, middle_col = sum(row_span) // 2, sum(col_span) // 2
    assert int(positive[middle_row].sum()) == col_span[1] - col_span[0]  # solid across
    assert int(positive[:, middle_col].sum()) == row_span[1] - row_span[0]  # solid down
    return row_span, col_span


def test_resize_longest_side() -> None:
    assert sam_resized_shape(80, 128, 64) == (40, 64)
    assert sam_resized_shape(128, 48, 64) == (64, 24)
    assert sam_resized_shape(100, 30, 64) == (64, 19)  # 19.2 -> 19
    assert sam_resized_shape(30, 100, 64) == (19, 64)
    assert sam_resized_shape(684, 1024, 1024) == (684, 1024)


def test_preprocess_pads_bottom_right_and_matches_transformers() -> None:
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(80, 128, 3), dtype=np.uint8)  # (H, W, 3), landscape
    pixels, resized, original = sam_preprocess(image, image_size=64)
    assert pixels.shape == (3, 64, 64) and resized == (40, 64) and original == (80, 128)
    assert torch.all(pixels[:, 40:] == 0)  # padding below the image, after normalisation
    assert pixels[:, :40].abs().sum() > 0
    processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    reference = processor(images=image, return_tensors="pt")
    assert [int(v) for v in reference["reshaped_input_sizes"][0]] == list(resized)
    torch.testing.assert_close(pixels, reference["pixel_values"][0], atol=1e-5, rtol=0)


def test_crop_of_padding_maps_coordinates_back() -> None:
    # landscape 80x128 -> resized 40x64 in the top-left of the 64x64 input; low-res masks are 32x32,
    # so low-res row r covers input rows 2r..2r+1 and original rows 4r..4r+3 (same for columns)
    logits = postprocess_mask(
        _low_res_box((5, 10), (8, 16)), padded_size=64, resized_size=(40, 64), original_size=(80, 128)
    )
    assert logits.shape == (80, 128)
    assert _positive_span(logits) == ((20, 40), (32, 64))

    # portrait 128x48 -> resized 64x24: the padding is on the right (input columns 24..63)
    logits = postprocess_mask(
        _low_res_box((4, 8), (3, 9)), padded_size=64, resized_size=(64, 24), original_size=(128, 48)
    )
    assert _positive_span(logits) == ((16, 32), (12, 36))


def test_crop_matters_for_non_square_images() -> None:
    # the decoder marks the whole image area (input rows 0..39) and nothing of the padding
    whole_image = _low_res_box((0, 20), (0, 32))
    logits = postprocess_mask(whole_image, padded_size=64, resized_size=(40, 64), original_size=(80, 128))
    assert bool((logits > 0).all())
    # without the crop (the padded square stretched onto the image) the bottom 3/8 would be lost
    stretched = F.interpolate(whole_image[None, None], size=(80, 128), mode="bilinear", align_corners=False)[0, 0]
    assert float((stretched > 0).float().mean()) < 0.7
    # and a centred crop (MedPLIB pads SAM inputs in the middle) would shift the mask down by 12 rows
    padded = F.interpolate(whole_image[None, None], size=(64, 64), mode="bilinear", align_corners=False)
    centred = F.interpolate(padded[..., 12:52, :], size=(80, 128), mode="bilinear", align_corners=False)[0, 0]
    assert not bool((centred > 0).all())


def test_forward_applies_each_images_own_sizes(head: GroundingHead, monkeypatch) -> None:
    """The whole head on hand-set decoder outputs: every <SEG> is cropped with its own image's sizes."""
    low_res = torch.stack(
        [_low_res_box((5, 10), (8, 16)), _low_res_box((4, 8), (3, 9)), _low_res_box((0, 20), (0, 32))]
    )  # (3, 32, 32)

    def fixed_decoder(**kwargs):
        count = kwargs["sparse_prompt_embeddings"].shape[0]
        return low_res[:count, None, None], torch.zeros(count, 1, 1)  # (N, 1, 1, 32, 32), (N, 1, 1)

    monkeypatch.setattr(head.sam.mask_decoder, "forward", fixed_decoder)
    images = [np.zeros((80, 128, 3), np.uint8), np.zeros((128, 48, 3), np.uint8)]
    prepared = [sam_preprocess(image, image_size=64) for image in images]
    masks = head(
        sam_pixel_values=torch.stack([p[0] for p in prepared]),
        seg_embeddings=torch.randn(3, head.seg_projection[0].in_features),
        batch_index=torch.tensor([0, 1, 0]),
        original_sizes=[p[2] for p in prepared],
        resized_sizes=[p[1] for p in prepared],
    )
    assert _positive_span(masks[0]) == ((20, 40), (32, 64))
    assert _positive_span(masks[1]) == ((16, 32), (12, 36))
    assert bool((masks[2] > 0).all()) and masks[2].shape == (80, 128)
