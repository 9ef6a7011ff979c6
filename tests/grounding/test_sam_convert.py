# ruff: noqa: E501  (one key mapping per line, real checkpoint names)
"""Original segment-anything / SAM-Med2D keys <-> transformers SamModel, round trips and what cannot be mapped."""

from __future__ import annotations

import pytest
import torch

from lightningmodules.models.sam_convert import (
    SamConversionError,
    convert_sam_checkpoint,
    expected_shapes,
    load_sam_med2d,
    missing_keys,
    pixel_statistics,
    sam_med2d_config,
    save_hf_checkpoint,
    to_hf_key,
    to_original_keys,
)

# original segment-anything key -> SamModel key (names as in the released sam_vit_b checkpoint)
KNOWN_PAIRS = {
    "image_encoder.pos_embed": "vision_encoder.pos_embed",
    "image_encoder.patch_embed.proj.weight": "vision_encoder.patch_embed.projection.weight",
    "image_encoder.blocks.0.norm1.weight": "vision_encoder.layers.0.layer_norm1.weight",
    "image_encoder.blocks.1.norm2.bias": "vision_encoder.layers.1.layer_norm2.bias",
    "image_encoder.blocks.0.attn.qkv.weight": "vision_encoder.layers.0.attn.qkv.weight",
    "image_encoder.blocks.1.attn.rel_pos_h": "vision_encoder.layers.1.attn.rel_pos_h",
    "image_encoder.blocks.0.mlp.lin2.bias": "vision_encoder.layers.0.mlp.lin2.bias",
    "image_encoder.neck.0.weight": "vision_encoder.neck.conv1.weight",
    "image_encoder.neck.1.bias": "vision_encoder.neck.layer_norm1.bias",
    "image_encoder.neck.2.weight": "vision_encoder.neck.conv2.weight",
    "image_encoder.neck.3.weight": "vision_encoder.neck.layer_norm2.weight",
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": "prompt_encoder.shared_embedding.positional_embedding",
    "prompt_encoder.point_embeddings.3.weight": "prompt_encoder.point_embed.3.weight",
    "prompt_encoder.not_a_point_embed.weight": "prompt_encoder.not_a_point_embed.weight",
    "prompt_encoder.no_mask_embed.weight": "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.mask_downscaling.0.weight": "prompt_encoder.mask_embed.conv1.weight",
    "prompt_encoder.mask_downscaling.1.bias": "prompt_encoder.mask_embed.layer_norm1.bias",
    "prompt_encoder.mask_downscaling.3.weight": "prompt_encoder.mask_embed.conv2.weight",
    "prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
    "prompt_encoder.mask_downscaling.6.bias": "prompt_encoder.mask_embed.conv3.bias",
    "mask_decoder.iou_token.weight": "mask_decoder.iou_token.weight",
    "mask_decoder.mask_tokens.weight": "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.0.self_attn.q_proj.weight": "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
    "mask_decoder.transformer.layers.1.norm4.bias": "mask_decoder.transformer.layers.1.layer_norm4.bias",
    "mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.bias": "mask_decoder.transformer.layers.0.cross_attn_image_to_token.out_proj.bias",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight": "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.transformer.final_attn_token_to_image.k_proj.weight": "mask_decoder.transformer.final_attn_token_to_image.k_proj.weight",
    "mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.layer_norm_final_attn.weight",
    "mask_decoder.output_upscaling.0.weight": "mask_decoder.upscale_conv1.weight",
    "mask_decoder.output_upscaling.1.bias": "mask_decoder.upscale_layer_norm.bias",
    "mask_decoder.output_upscaling.3.weight": "mask_decoder.upscale_conv2.weight",
    "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight": "mask_decoder.output_hypernetworks_mlps.2.proj_in.weight",
    "mask_decoder.output_hypernetworks_mlps.2.layers.1.weight": "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
    "mask_decoder.output_hypernetworks_mlps.2.layers.2.bias": "mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",
    "mask_decoder.iou_prediction_head.layers.0.bias": "mask_decoder.iou_prediction_head.proj_in.bias",
    "mask_decoder.iou_prediction_head.layers.1.weight": "mask_decoder.iou_prediction_head.layers.0.weight",
    "mask_decoder.iou_prediction_head.layers.2.weight": "mask_decoder.iou_prediction_head.proj_out.weight",
}


@pytest.fixture
def tiny_config(tiny_sam_dir):
    from transformers import SamConfig

    return SamConfig.from_pretrained(tiny_sam_dir)


@pytest.fixture
def random_hf_model(tiny_config):
    from transformers import SamModel

    model = SamModel(tiny_config).eval()
    with torch.no_grad():
        for p in model.parameters():  # zeros (pos_embed, rel_pos) would hide mix-ups
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def _original_state_dict(model) -> dict[str, torch.Tensor]:
    return to_original_keys(model.state_dict(), model.config)


def test_known_key_pairs(tiny_config) -> None:
    for original, hf in KNOWN_PAIRS.items():
        assert to_hf_key(original, tiny_config) == hf, original
    expected = expected_shapes(tiny_config)
    assert set(KNOWN_PAIRS.values()) <= set(expected)


def test_round_trip_hf_original_hf(random_hf_model) -> None:
    hf_state = random_hf_model.state_dict()
    original = _original_state_dict(random_hf_model)
    assert set(KNOWN_PAIRS) <= set(original)
    assert not any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in original)
    converted, unmapped = convert_sam_checkpoint(original, random_hf_model.config)
    assert unmapped == {}
    assert missing_keys(converted, random_hf_model.config) == []
    assert set(converted) == set(hf_state)
    for key, value in hf_state.items():
        assert torch.equal(converted[key], value), key
    from transformers import SamModel

    reloaded = SamModel(random_hf_model.config).eval()
    reloaded.load_state_dict(converted, strict=True)
    pixels, points = torch.randn(1, 3, 64, 64), torch.tensor([[[[20.0, 30.0]]]])
    with torch.no_grad():
        expected = random_hf_model(pixel_values=pixels, input_points=points).pred_masks
        torch.testing.assert_close(reloaded(pixel_values=pixels, input_points=points).pred_masks, expected)


def _sam_med2d_style(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original-layout weights plus SAM-Med2D's per-block adapters and pixel statistics."""
    state = _original_state_dict(model)
    hidden = model.config.vision_config.hidden_size
    adapter_keys = []
    for block in range(model.config.vision_config.num_hidden_layers):
        for name, shape in (
            ("channel.0.weight", (hidden // 4, hidden)),
            ("channel.2.weight", (hidden, hidden // 4)),
            ("spatial.0.weight", (hidden, hidden, 3, 3)),
            ("spatial.2.weight", (hidden, hidden, 4, 4)),
        ):
            key = f"image_encoder.blocks.{block}.Adapter.{name}"
            state[key] = torch.randn(shape)
            adapter_keys.append(key)
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    return state, adapter_keys


def test_sam_med2d_adapters_are_reported(random_hf_model, tmp_path) -> None:
    state, adapter_keys = _sam_med2d_style(random_hf_model)
    converted, unmapped = convert_sam_checkpoint(state, random_hf_model.config)
    assert sorted(unmapped) == sorted(adapter_keys)
    assert all("adapter" in why for why in unmapped.values())
    assert missing_keys(converted, random_hf_model.config) == []
    mean, std = pixel_statistics(state)
    assert mean == pytest.approx((0.485, 0.456, 0.406), abs=1e-6) and std == pytest.approx(
        (0.229, 0.224, 0.225), abs=1e-6
    )

    path = tmp_path / "sam-med2d_b.pth"
    torch.save({"model": state, "epoch": 3}, path)
    with pytest.raises(SamConversionError, match=r"8 adapter tensors in image-encoder blocks \[0, 1\]") as error:
        load_sam_med2d(path, config=random_hf_model.config)
    assert "Adapter.channel.0.weight" in str(error.value) and "allow_missing_adapters" in str(error.value)
    model = load_sam_med2d(path, config=random_hf_model.config, allow_missing_adapters=True)
    for key, value in random_hf_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    out_dir = save_hf_checkpoint(model, tmp_path / "hf", image_mean=mean, image_std=std)
    from datamodules.images import SamImageTransform
    from lightningmodules.models.grounding import load_sam

    assert torch.equal(
        load_sam(out_dir).state_dict()["mask_decoder.iou_token.weight"],
        random_hf_model.state_dict()["mask_decoder.iou_token.weight"],
    )
    assert SamImageTransform.from_pretrained(out_dir).image_size == 64


def test_other_problems_block_the_load(random_hf_model, tmp_path) -> None:
    state = _original_state_dict(random_hf_model)
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.blocks.0.extra.weight"] = torch.zeros(2)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(SamConversionError) as error:
        load_sam_med2d(path, config=random_hf_model.config, allow_missing_adapters=True)
    message = str(error.value)
    assert "image_encoder.blocks.0.extra.weight" in message and "mask_decoder.iou_token.weight" in message


def test_position_embeddings_of_another_resolution(random_hf_model) -> None:
    state = _original_state_dict(random_hf_model)
    grid = random_hf_model.config.vision_config.image_size // random_hf_model.config.vision_config.patch_size
    state["image_encoder.pos_embed"] = torch.randn(1, 2 * grid, 2 * grid, 32)  # trained at twice the size
    state["image_encoder.blocks.1.attn.rel_pos_h"] = torch.randn(4 * grid - 1, 16)  # global-attention block
    _, unmapped = convert_sam_checkpoint(state, random_hf_model.config)
    assert set(unmapped) == {"image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h"}
    assert "shape" in unmapped["image_encoder.pos_embed"]
    converted, unmapped = convert_sam_checkpoint(state, random_hf_model.config, resize_position_embeddings=True)
    assert unmapped == {}
    assert converted["vision_encoder.pos_embed"].shape == (1, grid, grid, 32)
    assert converted["vision_encoder.layers.1.attn.rel_pos_h"].shape == (2 * grid - 1, 16)


def test_sam_med2d_architecture() -> None:
    """ViT-B at 256 px: a 16x16 grid, so 31-row relative tables in the global blocks, 27 in the windowed ones."""
    shapes = expected_shapes(sam_med2d_config())
    assert shapes["vision_encoder.pos_embed"] == (1, 16, 16, 768)
    assert shapes["vision_encoder.layers.2.attn.rel_pos_h"] == (31, 64)
    assert shapes["vision_encoder.layers.0.attn.rel_pos_h"] == (27, 64)
    assert shapes["prompt_encoder.shared_embedding.positional_embedding"] == (2, 128)
    assert not any("Adapter" in k for k in shapes)
