"""Original segment-anything (and SAM-Med2D) checkpoints -> transformers ``SamModel`` weights.

The key renames follow the idea of transformers' ``models/sam/convert_sam_to_hf.py`` (not shipped in
the installed wheel, and it downloads from the Hub): a table of prefix renames, plus SAM's MLP heads,
whose ``layers.{0..L-1}`` become ``proj_in`` / ``layers.{k-1}`` / ``proj_out``. Here every rule is a
pair of templates, so the same table converts both ways (:func:`to_hf_key`, :func:`to_original_key`).

:func:`convert_sam_checkpoint` also checks every converted key and shape against the ``SamModel`` the
config describes (built on the meta device, no memory), and reports what cannot be represented:
SAM-Med2D's image-encoder adapters (``image_encoder.blocks.{i}.Adapter.*``) have no place in HF's
``SamVisionLayer``. See docs/sam_med2d.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IGNORED_ORIGINAL_KEYS = ("pixel_mean", "pixel_std")  # preprocessing constants, not weights
TIED_HF_KEY = "shared_image_embedding.positional_embedding"  # = prompt_encoder.shared_embedding.positional_embedding
ADAPTER_MARKER = "Adapter"  # SAM-Med2D's image-encoder adapters: image_encoder.blocks.{i}.Adapter.*
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

# (original prefix, HF prefix). {i} / {n} are integers carried across; the first matching rule wins,
# so specific rules come before general ones. Whatever follows the prefix is kept as it is.
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("image_encoder.blocks.{i}.norm{n}.", "vision_encoder.layers.{i}.layer_norm{n}."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("prompt_encoder.", "prompt_encoder."),
    ("mask_decoder.transformer.layers.{i}.norm{n}.", "mask_decoder.transformer.layers.{i}.layer_norm{n}."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.", "mask_decoder."),
)
# SAM's MLP heads; their layer names depend on the depth (hypernetwork MLPs: 3, IoU head: config).
MLP_HEADS = (r"mask_decoder\.output_hypernetworks_mlps\.\d+", r"mask_decoder\.iou_prediction_head")


class SamConversionError(RuntimeError):
    """A checkpoint cannot be loaded faithfully into ``SamModel``."""


@cache
def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile("^" + pattern)


def _rename_prefix(key: str, *, to_hf: bool) -> str:
    for original, hf in PREFIX_RULES:
        source, target = (original, hf) if to_hf else (hf, original)
        match = _template_regex(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end() :]
    return key


def _mlp_depths(config) -> dict[str, int]:
    return {MLP_HEADS[0]: 3, MLP_HEADS[1]: int(config.mask_decoder_config.iou_head_depth)}


def _rename_mlp(key: str, depths: Mapping[str, int], *, to_hf: bool) -> str:
    """``layers.0`` <-> ``proj_in``, ``layers.k`` <-> ``layers.{k-1}``, ``layers.{L-1}`` <-> ``proj_out``."""
    for head, depth in depths.items():
        if to_hf:
            match = re.match(rf"^({head})\.layers\.(\d+)\.(.*)$", key)
            if match:
                index = int(match.group(2))
                name = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
                return f"{match.group(1)}.{name}.{match.group(3)}"
        else:
            match = re.match(rf"^({head})\.(proj_in|proj_out|layers\.(\d+))\.(.*)$", key)
            if match:
                part = match.group(2)
                index = 0 if part == "proj_in" else depth - 1 if part == "proj_out" else int(match.group(3)) + 1
                return f"{match.group(1)}.layers.{index}.{match.group(4)}"
    return key


def to_hf_key(key: str, config) -> str:
    """An original segment-anything key -> the ``SamModel`` key (unknown parts are kept)."""
    return _rename_mlp(_rename_prefix(key, to_hf=True), _mlp_depths(config), to_hf=True)


def to_original_key(key: str, config) -> str:
    """A ``SamModel`` key -> the original segment-anything key."""
    return _rename_prefix(_rename_mlp(key, _mlp_depths(config), to_hf=False), to_hf=False)


def expected_shapes(config) -> dict[str, torch.Size]:
    """Every ``SamModel`` state-dict key and shape for ``config``, built on the meta device."""
    from transformers import SamModel

    with torch.device("meta"):
        model = SamModel(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def to_original_keys(hf_state_dict: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A ``SamModel`` state dict in the original segment-anything layout (the tied copy
    ``shared_image_embedding.positional_embedding`` is dropped: the original stores it once)."""
    return {to_original_key(key, config): value for key, value in hf_state_dict.items() if key != TIED_HF_KEY}


def _resize_position_embedding(value: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g, g, C) -> (1, grid, grid, C), bilinear (SAM-Med2D's ``load_from`` does the same)."""
    resized = F.interpolate(
        value.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear", align_corners=False
    )  # (1, C, grid, grid)
    return resized.permute(0, 2, 3, 1).to(value.dtype)  # (1, grid, grid, C)


def _resize_relative_position(value: torch.Tensor, length: int) -> torch.Tensor:
    """(L, head_dim) -> (length, head_dim), linear (what SamVisionAttention.get_rel_pos does at run time)."""
    resized = F.interpolate(value.float().T[None], size=length, mode="linear")  # (1, head_dim, length)
    return resized[0].T.to(value.dtype)  # (length, head_dim)


def convert_sam_checkpoint(
    state_dict: Mapping[str, torch.Tensor], config, *, resize_position_embeddings: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Original-layout state dict -> (``SamModel`` state dict, {original key: why it is not mapped}).

    ``pixel_mean`` / ``pixel_std`` are preprocessing constants and are dropped (see
    :func:`pixel_statistics`). A renamed key that ``SamModel`` does not have (e.g. SAM-Med2D's
    ``Adapter`` weights) or whose shape differs is reported, not converted. With
    ``resize_position_embeddings`` the absolute position embedding and the global-attention relative
    position tables are interpolated to the config's grid instead of being reported (for loading a
    1024-px SAM at another input size; SAM-Med2D's own checkpoints are already at 256 px).
    """
    expected = expected_shapes(config)
    converted: dict[str, torch.Tensor] = {}
    unmapped: dict[str, str] = {}
    for key, value in state_dict.items():
        if key in IGNORED_ORIGINAL_KEYS:
            continue
        hf_key = to_hf_key(key, config)
        if hf_key not in expected:
            reason = (
                "SAM-Med2D image-encoder adapter: HF SamVisionLayer has no adapter"
                if ADAPTER_MARKER in key
                else f"no SamModel parameter {hf_key!r}"
            )
            unmapped[key] = reason
            continue
        shape = expected[hf_key]
        if value.shape != shape and resize_position_embeddings:
            if hf_key == "vision_encoder.pos_embed":
                value = _resize_position_embedding(value, shape[1])
            elif re.search(r"\.attn\.rel_pos_[hw]$", hf_key) and value.shape[1:] == shape[1:]:
                value = _resize_relative_position(value, shape[0])
        if value.shape != shape:
            unmapped[key] = f"shape {tuple(value.shape)} != SamModel's {tuple(shape)} for {hf_key!r}"
            continue
        converted[hf_key] = value
    tied_source = "prompt_encoder.shared_embedding.positional_embedding"
    if tied_source in converted and TIED_HF_KEY in expected:
        converted[TIED_HF_KEY] = converted[tied_source]
    return converted, unmapped


def missing_keys(hf_state_dict: Mapping[str, torch.Tensor], config) -> list[str]:
    """``SamModel`` keys the converted state dict does not provide."""
    return sorted(set(expected_shapes(config)) - set(hf_state_dict))


def pixel_statistics(state_dict: Mapping[str, torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) on the 0..1 scale from a checkpoint's pixel_mean / pixel_std (SAM's defaults if absent)."""
    mean = state_dict.get("pixel_mean")
    std = state_dict.get("pixel_std")
    mean_values = SAM_PIXEL_MEAN if mean is None else tuple(float(v) for v in mean.flatten())
    std_values = SAM_PIXEL_STD if std is None else tuple(float(v) for v in std.flatten())
    return tuple(v / 255.0 for v in mean_values), tuple(v / 255.0 for v in std_values)


# -- SAM-Med2D ------------------------------------------------------------------------------------


def sam_med2d_config():
    """SAM-Med2D's ``sam-med2d_b.pth`` architecture: ViT-B at 256 px, patch 16 (16x16 grid), window 14,
    global attention in blocks 2, 5, 8, 11; prompt encoder and mask decoder as SAM's."""
    from transformers import SamConfig

    return SamConfig(
        vision_config=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=256,
            patch_size=16,
            window_size=14,
            global_attn_indexes=[2, 5, 8, 11],
        ),
        prompt_encoder_config=dict(image_size=256, patch_size=16),
        mask_decoder_config=dict(),
    )


def _describe_adapters(keys: list[str]) -> str:
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.search(r"blocks\.(\d+)\.", k))})
    names = sorted({re.sub(r"^.*?\.Adapter\.", "Adapter.", k) for k in keys})
    return (
        f"{len(keys)} adapter tensors in image-encoder blocks {blocks}: {', '.join(names)} "
        f"(per block). HF SamVisionLayer has no adapter, so the encoder would compute different "
        f"features than SAM-Med2D's."
    )


def load_sam_med2d(
    path: str | Path, *, allow_missing_adapters: bool = False, config=None, resize_position_embeddings: bool = False
) -> nn.Module:
    """A SAM-Med2D checkpoint (``torch.save`` of ``{"model": state_dict, ...}`` or a bare state dict)
    as a transformers ``SamModel``.

    Raises :class:`SamConversionError` listing what blocks a faithful load: image-encoder adapter
    weights (unless ``allow_missing_adapters=True``, which drops them and loads a plain SAM ViT-B
    encoder), any other key without a ``SamModel`` counterpart or with another shape, and any
    ``SamModel`` parameter the checkpoint lacks.
    """
    from transformers import SamModel

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    config = config if config is not None else sam_med2d_config()
    converted, unmapped = convert_sam_checkpoint(
        state_dict, config, resize_position_embeddings=resize_position_embeddings
    )
    adapters = [k for k in unmapped if ADAPTER_MARKER in k]
    others = {k: why for k, why in unmapped.items() if ADAPTER_MARKER not in k}
    missing = missing_keys(converted, config)
    problems = []
    if adapters and not allow_missing_adapters:
        problems.append(_describe_adapters(adapters) + " Pass allow_missing_adapters=True to load without them.")
    if others:
        problems.append("keys without a SamModel counterpart:\n" + "\n".join(f"  {k}: {w}" for k, w in others.items()))
    if missing:
        problems.append("SamModel parameters missing from the checkpoint:\n" + "\n".join(f"  {k}" for k in missing))
    if problems:
        raise SamConversionError(
            f"{path}: cannot load faithfully into transformers' SamModel:\n- " + "\n- ".join(problems)
        )
    if adapters:
        log.warning("%s: %s Loading without them (allow_missing_adapters=True).", path, _describe_adapters(adapters))
    model = SamModel(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def save_hf_checkpoint(
    model: nn.Module, out_dir: str | Path, *, image_mean: tuple[float, ...], image_std: tuple[float, ...]
) -> Path:
    """Write a converted model as a checkpoint directory that :func:`grounding.load_sam` and
    ``SamImageTransform.from_pretrained`` read (weights, config, SAM preprocessor config)."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    size = int(model.config.vision_config.image_size)
    low_res = 4 * int(model.config.prompt_encoder_config.image_embedding_size)
    processor = {
        "image_processor_type": "SamImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
        "do_pad": True,
        "pad_size": {"height": size, "width": size},
        "mask_size": {"longest_edge": low_res},
        "mask_pad_size": {"height": low_res, "width": low_res},
        "do_convert_rgb": True,
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out_dir
