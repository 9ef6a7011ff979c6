"""Image loading and the vision processor's transform, read from the checkpoint's own config.

``ImageTransform`` reproduces HF's image processors (CLIP, SigLIP, DINOv2's BiT: resize, center crop,
rescale, normalise) with the settings HF's own class reads from ``preprocessor_config.json``, with LLaVA's
optional pad-to-square in the mean colour, without the per-call overhead of the HF processor classes.
``SamImageTransform`` is SAM's own input transform (MedPLIB grounding: SAM sees a separate copy of each
image, resized and padded to S x S).
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
    """PIL image -> normalised (3, H, W) float tensor, as the vision checkpoint expects.

    ``size`` / ``crop_size`` are HF's size dicts: ``{"shortest_edge": n}`` (the short side becomes n, the
    aspect ratio kept) or ``{"height": h, "width": w}``. The steps and their order are HF's image
    processors' (resize, center crop, rescale, normalise), each switched by its ``do_*`` flag.
    """

    size: dict
    crop_size: dict | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    pad_square: bool = False
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_pretrained(cls, path: str | Path, *, pad_square: bool = False) -> ImageTransform:
        """The settings of ``preprocessor_config.json`` as HF's own image processor class reads them.

        HF's class resolves every shape the file may take (``"size": 336`` as openai's CLIP ships it,
        size dicts, missing keys with the class's defaults); a file naming no known processor class is
        read with CLIP's rules.
        """
        file = Path(path) / "preprocessor_config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: the vision checkpoint has no preprocessor_config.json")
        processor = _hf_image_processor(Path(path))
        size = _plain_size(processor.size) or {}
        if "shortest_edge" not in size and not {"height", "width"} <= size.keys():
            raise ValueError(f"{file}: size {size} is not supported: give shortest_edge, or height and width")
        crop_size = _plain_size(getattr(processor, "crop_size", None))
        return cls(
            size=size,
            crop_size=crop_size,
            image_mean=tuple(float(m) for m in processor.image_mean),
            image_std=tuple(float(s) for s in processor.image_std),
            resample=int(processor.resample),
            do_center_crop=bool(getattr(processor, "do_center_crop", False)) and crop_size is not None,
            rescale_factor=float(processor.rescale_factor),
            pad_square=pad_square,
            do_resize=bool(processor.do_resize),
            do_rescale=bool(processor.do_rescale),
            do_normalize=bool(processor.do_normalize),
        )

    @property
    def output_size(self) -> tuple[int, int]:
        if self.do_center_crop and self.crop_size:
            return int(self.crop_size["height"]), int(self.crop_size["width"])
        if "shortest_edge" in self.size:
            return int(self.size["shortest_edge"]), int(self.size["shortest_edge"])
        return int(self.size["height"]), int(self.size["width"])

    def resize(self, img: Image.Image) -> Image.Image:
        """HF's resize rule (``int(edge * long / short)`` for the long side), with PIL's filter as HF uses it."""
        if not self.do_resize:
            return img
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
            left, top = (w - cw) // 2, (h - ch) // 2  # HF floors the offset; outside the image PIL pads black, as HF
            img = img.crop((left, top, left + cw, top + ch))
        arr = np.asarray(img)  # (H, W, 3) uint8
        if self.do_rescale:  # in float64, then float32: HF's rounding, so the pixels equal HF's exactly
            arr = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            arr = arr.astype(np.float32)
        if self.do_normalize:
            arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (3, H, W)


def _hf_image_processor(path: Path):
    """HF's PIL image processor for the checkpoint folder (CLIP's class when the file names none)."""
    from transformers import AutoImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except ValueError:  # no image_processor_type / feature_extractor_type / model_type to go by
        return CLIPImageProcessorPil.from_pretrained(path)


def _plain_size(size) -> dict | None:
    """HF's ``SizeDict`` (or dict) -> a plain dict of the keys that are set; None when there is none."""
    if size is None:
        return None
    items = size.items() if isinstance(size, dict) else vars(size).items()
    plain = {key: int(value) for key, value in items if value is not None}
    return plain or None


# -- SAM's own copy of the image (MedPLIB grounding) ------------------------------------------------

SAM_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SAM's pixel_mean 123.675, 116.28, 103.53 over 255
SAM_IMAGENET_STD = (0.229, 0.224, 0.225)  # SAM's pixel_std 58.395, 57.12, 57.375 over 255


def sam_resized_shape(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """SAM's ResizeLongestSide: the longest side becomes ``longest_edge``, rounded half up."""
    scale = longest_edge / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_preprocess(
    image: Image.Image | np.ndarray,
    *,
    image_size: int = 1024,
    image_mean: tuple[float, ...] = SAM_IMAGENET_MEAN,
    image_std: tuple[float, ...] = SAM_IMAGENET_STD,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """PIL image or uint8 (H, W[, 3]) array -> ``(pixels (3, S, S), resized (h, w), original (H, W))``.

    Resize the longest side to S (bilinear), scale to [0, 1], normalise, then pad the bottom and
    right with zeros (after normalisation, as SAM does), so the image sits in the top-left corner;
    the grounding head crops its masks back with ``resized`` and ``original``.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    original = (image.height, image.width)
    resized = sam_resized_shape(*original, image_size)
    image = image.resize((resized[1], resized[0]), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0  # (h, w, 3)
    array = (array - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    pixels = torch.zeros(3, image_size, image_size)  # (3, S, S)
    pixels[:, : resized[0], : resized[1]] = torch.from_numpy(array.transpose(2, 0, 1).copy())  # (3, h, w)
    return pixels, resized, original


@dataclass
class SamImageTransform:
    """:func:`sam_preprocess` with the input size and statistics of a SAM checkpoint."""

    image_size: int
    image_mean: tuple[float, ...] = SAM_IMAGENET_MEAN
    image_std: tuple[float, ...] = SAM_IMAGENET_STD

    def __post_init__(self) -> None:
        self.image_size = int(self.image_size)
        self.image_mean = tuple(float(m) for m in self.image_mean)
        self.image_std = tuple(float(s) for s in self.image_std)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SamImageTransform:
        """Size from ``preprocessor_config.json`` (``size.longest_edge``) when present, else the
        model's ``vision_config.image_size``; mean/std from the preprocessor config or ImageNet's."""
        path = Path(path)
        model_config = json.loads((path / "config.json").read_text())
        image_size = int(model_config.get("vision_config", {}).get("image_size", 1024))
        mean, std = SAM_IMAGENET_MEAN, SAM_IMAGENET_STD
        processor_file = path / "preprocessor_config.json"
        if processor_file.is_file():
            processor = json.loads(processor_file.read_text())
            size = processor.get("size", {})
            image_size = int(size.get("longest_edge", image_size)) if isinstance(size, dict) else int(size)
            mean = processor.get("image_mean", mean)
            std = processor.get("image_std", std)
        return cls(image_size=image_size, image_mean=mean, image_std=std)

    def __call__(self, image: Image.Image | np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        return sam_preprocess(image, image_size=self.image_size, image_mean=self.image_mean, image_std=self.image_std)
