"""Image loading and the vision processor's transform, read from the checkpoint's own config.

``ImageTransform`` reproduces HF's CLIP/SigLIP image processors (resize, center crop, rescale,
normalise) from ``preprocessor_config.json``, with LLaVA's optional pad-to-square in the mean colour,
without the per-call overhead of the HF processor classes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datamodules.problems import DataError

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC}


def load_image(path: str | Path | None = None, data: bytes | None = None, *, record: str = "?") -> Image.Image:
    """Decode an image file or bytes to RGB; 16-bit and float images are rescaled to 8 bit.

    A missing, corrupt or truncated image raises :class:`DataError` naming the file and record.
    """
    source = str(path) if path is not None else "<bytes>"
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
        img.load()  # forces a full decode so truncated files fail here, not later
    except FileNotFoundError:
        raise DataError(f"{source}: record {record}: field 'image': file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{source}: record {record}: field 'image': corrupt or truncated image ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8))
    return img.convert("RGB")


def load_mask(path: str | Path, *, record: str = "?", field_name: str = "mask") -> np.ndarray:
    """A binary mask at its original resolution: (H, W) bool, pixel >= 1 is foreground.

    Grayscale, 16-bit, palette (the index) and colour masks (any channel, alpha ignored) all work.
    A missing or undecodable file raises :class:`DataError` naming the file, record and field.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("LA", "PA"):  # drop alpha: the first band is the label / palette index
                arr = np.asarray(img.getchannel(0))
            else:
                arr = np.asarray(img.convert("RGB") if img.mode == "RGBA" else img)
    except FileNotFoundError:
        raise DataError(f"{path}: record {record}: field '{field_name}': file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: record {record}: field '{field_name}': corrupt or truncated mask ({e})") from None
    if arr.ndim == 3:  # (H, W, C) colour mask -> (H, W): foreground where any channel is set
        return (arr >= 1).any(axis=2)
    return arr >= 1


def image_size(path: str | Path | None = None, data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    with Image.open(io.BytesIO(data) if data is not None else path) as img:
        return img.size


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre the image on a square canvas of the fill colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass
class ImageTransform:
    """PIL image -> normalised (3, H, W) float tensor, as the vision checkpoint expects."""

    size: dict
    crop_size: dict | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    pad_square: bool = False

    @classmethod
    def from_pretrained(cls, path: str | Path, *, pad_square: bool = False) -> ImageTransform:
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: the vision checkpoint has no preprocessor_config.json")
        cfg = json.loads(file.read_text())
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        return cls(
            size=size,
            crop_size=cfg.get("crop_size"),
            image_mean=tuple(cfg["image_mean"]),
            image_std=tuple(cfg["image_std"]),
            resample=int(cfg.get("resample", 3)),
            do_center_crop=bool(cfg.get("do_center_crop", False)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            pad_square=pad_square,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop and self.crop_size:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if "shortest_edge" in self.size:
            return int(self.size["shortest_edge"]), int(self.size["shortest_edge"])
        return int(self.size["height"]), int(self.size["width"])

    def resize(self, img: Image.Image) -> Image.Image:
        resample = _RESAMPLE.get(self.resample, Image.BICUBIC)
        if "shortest_edge" in self.size:
            edge = int(self.size["shortest_edge"])
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(edge * long / short)
            new_w, new_h = (edge, new_long) if w <= h else (new_long, edge)
            return img.resize((new_w, new_h), resample)
        return img.resize((int(self.size["width"]), int(self.size["height"])), resample)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.pad_square:
            img = pad_to_square(img, tuple(int(m * 255) for m in self.image_mean))  # as LLaVA's expand2square
        img = self.resize(img)
        if self.do_center_crop and self.crop_size:
            ch, cw = int(self.crop_size["height"]), int(self.crop_size["width"])
            w, h = img.size
            left, top = (w - cw) // 2, (h - ch) // 2  # HF's CLIP processors floor the offset
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img, dtype=np.float32) * self.rescale_factor  # (H, W, 3)
        arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (3, H, W)
