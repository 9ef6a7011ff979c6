"""GroundingHead: shapes, what trains and what stays frozen, the no-<SEG> fallback."""

from __future__ import annotations

import pytest
import torch

from datamodules.images import SamImageTransform
from lightningmodules.losses import mask_losses
from lightningmodules.models.grounding import GroundingHead, load_sam, pair_with_targets
from medcore.choices import TINY_MODELS
from pipeline.zoo.builders import BUILDERS

LLM_HIDDEN = 24  # conftest's head fixture


def _batch(head: GroundingHead, sizes: list[tuple[int, int]]):
    """SAM pixels (B, 3, S, S) and (original, resized) sizes for images of the given (H, W)."""
    transform = SamImageTransform(image_size=head.image_size)
    pixels, resized, original = [], [], []
    for height, width in sizes:
        image = (torch.rand(height, width, 3) * 255).to(torch.uint8).numpy()
        px, rs, og = transform(image)
        pixels.append(px)
        resized.append(rs)
        original.append(og)
    return torch.stack(pixels), original, resized


def test_tiny_sam_is_a_model_path(tiny_sam_dir) -> None:
    assert "sam" in TINY_MODELS and "sam" in BUILDERS
    assert (tiny_sam_dir / "preprocessor_config.json").is_file()
    transform = SamImageTransform.from_pretrained(tiny_sam_dir)
    assert transform.image_size == 64
    assert transform.image_mean == pytest.approx((0.485, 0.456, 0.406))


def test_decoder_and_forward_shapes(head: GroundingHead) -> None:
    pixels, original, resized = _batch(head, [(40, 64), (90, 30)])
    embeddings = head.image_embeddings(pixels)
    assert embeddings.shape == (2, 32, 8, 8)  # (B, C, g, g)
    low_res = head.decode(image_embeddings=embeddings[[0, 1, 1]], prompt_embeddings=torch.randn(3, head.prompt_dim))
    assert low_res.shape == (3, 32, 32)  # (N, 4g, 4g)
    seg = torch.randn(3, LLM_HIDDEN)
    masks = head(
        sam_pixel_values=pixels,
        seg_embeddings=seg,
        batch_index=torch.tensor([0, 1, 1]),
        original_sizes=original,
        resized_sizes=resized,
    )
    assert [tuple(m.shape) for m in masks] == [(40, 64), (90, 30), (90, 30)]
    assert (
        head(
            sam_pixel_values=pixels,
            seg_embeddings=seg[:0],
            batch_index=torch.tensor([], dtype=torch.long),
            original_sizes=original,
            resized_sizes=resized,
        )
        == []
    )


def test_only_images_with_seg_are_encoded(head: GroundingHead, monkeypatch) -> None:
    pixels, original, resized = _batch(head, [(64, 64), (32, 64), (64, 20)])
    seen = []
    real = head.image_embeddings
    monkeypatch.setattr(head, "image_embeddings", lambda px: (seen.append(px.shape[0]), real(px))[1])
    head(
        sam_pixel_values=pixels,
        seg_embeddings=torch.randn(2, LLM_HIDDEN),
        batch_index=torch.tensor([2, 2]),
        original_sizes=original,
        resized_sizes=resized,
    )
    assert seen == [1]  # one image encoded once, for both of its <SEG>s


def test_gradients_reach_decoder_and_projection_only(head: GroundingHead) -> None:
    head.train()
    assert not head.sam.vision_encoder.training and not head.sam.prompt_encoder.training
    assert head.sam.mask_decoder.training and head.seg_projection.training
    pixels, original, resized = _batch(head, [(40, 64), (64, 48)])
    hidden = torch.randn(2, LLM_HIDDEN, requires_grad=True)  # the LLM's <SEG> hidden states
    masks = head(
        sam_pixel_values=pixels,
        seg_embeddings=hidden,
        batch_index=torch.tensor([0, 1]),
        original_sizes=original,
        resized_sizes=resized,
    )
    targets = [torch.rand(m.shape) > 0.5 for m in masks]
    mask_losses(masks, targets, bce_weight=1.0, dice_weight=1.0)["loss"].backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0  # flows on into the LLM
    for name, p in head.named_parameters():
        unused = name.startswith(
            (
                "sam.mask_decoder.iou_prediction_head.",
                "sam.mask_decoder.output_hypernetworks_mlps.1.",
                "sam.mask_decoder.output_hypernetworks_mlps.2.",
                "sam.mask_decoder.output_hypernetworks_mlps.3.",
            )
        )
        trains = name.startswith(("seg_projection.", "sam.mask_decoder.")) and not unused
        assert p.requires_grad == trains, name
        if trains:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    assert sum(float(p.grad.abs().sum()) for p in head.sam.mask_decoder.parameters() if p.grad is not None) > 0
    assert all(float(p.grad.abs().sum()) > 0 for p in head.seg_projection.parameters())


def test_frozen_mask_decoder_option(tiny_sam_dir) -> None:
    frozen = GroundingHead(sam=load_sam(tiny_sam_dir), llm_hidden_size=8, train_mask_decoder=False)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {
        "seg_projection.0.weight",
        "seg_projection.0.bias",
        "seg_projection.2.weight",
        "seg_projection.2.bias",
    }
    assert frozen.seg_projection[2].out_features == 32  # prompt_dim of the tiny SAM


def test_predict_fallback_without_seg(head: GroundingHead) -> None:
    pixels, original, resized = _batch(head, [(40, 64), (50, 50), (64, 30)])
    seg = torch.randn(3, LLM_HIDDEN)
    batch_index = torch.tensor([0, 0, 2])  # sample 0: two <SEG>, sample 1: none, sample 2: one
    head.eval()
    predictions = head.predict(
        sam_pixel_values=pixels,
        seg_embeddings=seg,
        batch_index=batch_index,
        original_sizes=original,
        resized_sizes=resized,
    )
    assert predictions[1] is None and head.no_seg_count == 1
    assert predictions[0].shape == (40, 64) and predictions[2].shape == (64, 30)
    first_only = head(
        sam_pixel_values=pixels,
        seg_embeddings=seg[[0]],
        batch_index=batch_index[[0]],
        original_sizes=original,
        resized_sizes=resized,
    )[0]
    torch.testing.assert_close(predictions[0], first_only)  # the first <SEG> of a sample is its mask
    head.predict(
        sam_pixel_values=pixels[:1],
        seg_embeddings=seg[:0],
        batch_index=batch_index[:0],
        original_sizes=original[:1],
        resized_sizes=resized[:1],
    )
    assert head.no_seg_count == 2


def test_zero_loss_keeps_every_trainable_parameter_in_the_graph(head: GroundingHead) -> None:
    zero = head.zero_loss()
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and float(p.grad.abs().sum()) == 0.0, name


def test_pair_with_targets() -> None:
    masks = [torch.full((2, 2), float(i)) for i in range(4)]
    batch_index = torch.tensor([0, 0, 1, 3])
    t0a, t0b, t3 = torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool), torch.eye(2).bool()
    predictions, targets, unpaired = pair_with_targets(masks, batch_index, [[t0a, t0b], None, None, t3])
    assert [float(p[0, 0]) for p in predictions] == [0.0, 1.0, 3.0]
    assert targets[0] is t0a and targets[1] is t0b and targets[2] is t3
    assert unpaired == 1  # sample 1's <SEG> has no target
    _, _, unpaired = pair_with_targets(masks, batch_index, [t0a, None, None, t3])
    assert unpaired == 2  # sample 0's second <SEG> has no second target
