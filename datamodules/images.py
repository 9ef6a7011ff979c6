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
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datamodules.problems import DataError, Problem
from datamodules.specs import DEFAULT_MAX_IMAGE_PIXELS

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC}
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


@contextmanager
def open_image(
    path: str | Path | None = None,
    data: bytes | None = None,
    *,
    record: str = "?",
    field_name: str = "image",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[Image.Image]:
    """The image with its header read and nothing decoded, its pixel count checked against ``max_pixels``.

    Every problem is a :class:`DataError` naming file, record and field, whose ``problem.kind`` is
    ``missing_<what>``, ``corrupt_<what>`` or ``<what>_too_large`` (``what``: image, or mask for a mask field),
    so a decompression bomb is a bad record like any other, found before a pixel is decoded. PIL's own limit
    (``Image.MAX_IMAGE_PIXELS``, process-wide) is raised when ``max_pixels`` is above it, never lowered.
    """
    source = str(path) if path is not None else "<bytes>"
    what = "image" if field_name == "image" else "mask"
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL errors past twice its limit; ours decides
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            img = Image.open(io.BytesIO(data) if data is not None else path)
    except FileNotFoundError:
        raise _image_error(source, record, field_name, "file not found", f"missing_{what}") from None
    except Image.DecompressionBombError as e:  # PIL read a header past twice its limit
        found = _PIL_PIXELS.search(str(e))
        pixels = int(found.group(1)) if found else max_pixels + 1
        raise _image_error(source, record, field_name, _too_large(pixels, max_pixels), f"{what}_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _image_error(
            source, record, field_name, f"corrupt or truncated {what} ({e})", f"corrupt_{what}"
        ) from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            reason = f"{width}x{height} is " + _too_large(width * height, max_pixels)
            raise _image_error(source, record, field_name, reason, f"{what}_too_large")
        yield img


def _too_large(pixels: int, limit: int) -> str:
    return (
        f"{pixels} pixels, more than max_image_pixels={limit} (a decompression bomb? raise the dataset's "
        "max_image_pixels if the image is real)"
    )


def _image_error(source: str, record: str, field_name: str, reason: str, kind: str) -> DataError:
    problem = Problem(source, str(record), field_name, reason, kind)
    return DataError(str(problem), problem)


def _decode(img: Image.Image, source: str, record: str, field_name: str, what: str) -> None:
    """Decode every pixel (so a truncated file fails here, not in a later transform)."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _image_error(
            source, record, field_name, f"corrupt or truncated {what} ({e})", f"corrupt_{what}"
        ) from None


def load_image(
    path: str | Path | None = None,
    data: bytes | None = None,
    *,
    record: str = "?",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode an image file or bytes to RGB; 16-bit and float images are rescaled to 8 bit.

    A missing, corrupt, truncated or too large image (:func:`open_image`), or a float image with NaN or
    infinite pixels, raises :class:`DataError` naming the file, record and field.
    """
    source = str(path) if path is not None else "<bytes>"
    with open_image(path, data, record=record, max_pixels=max_pixels) as img:
        _decode(img, source, record, "image", "image")
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise _image_error(
                    source, record, "image", "non-finite (NaN or infinite) pixel values", "corrupt_image"
                )
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def load_mask(
    path: str | Path, *, record: str = "?", field_name: str = "mask", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A binary mask at its original resolution: (H, W) bool, pixel >= 1 is foreground.

    Grayscale, 16-bit, palette (the index) and colour masks (any channel, alpha ignored) all work; a float mask
    only when every value is a whole number (a probability map would threshold to an empty target). A missing,
    undecodable or too large file, or fractional float values, raise :class:`DataError` naming file, record and
    field.
    """
    with open_image(path, record=record, field_name=field_name, max_pixels=max_pixels) as img:
        _decode(img, str(path), record, field_name, "mask")
        if img.mode in ("LA", "PA"):  # drop alpha: the first band is the label / palette index
            arr = np.asarray(img.getchannel(0))
        else:
            arr = np.asarray(img.convert("RGB") if img.mode == "RGBA" else img)
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        finite = arr[np.isfinite(arr)]
        values = f"{finite.min():g} to {finite.max():g}" if finite.size else "no finite value"
        reason = (
            f"float mask with fractional or non-finite values ({values}): a mask is a label image, pixel >= 1 is "
            "foreground (save it as 8-bit, e.g. (mask > 0.5) * 255)"
        )
        raise _image_error(str(path), record, field_name, reason, "bad_mask")
    if arr.ndim == 3:  # (H, W, C) colour mask -> (H, W): foreground where any channel is set
        return (arr >= 1).any(axis=2)
    return arr >= 1


def image_size(
    path: str | Path | None = None,
    data: bytes | None = None,
    *,
    record: str = "?",
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels (:func:`open_image`'s checks)."""
    with open_image(path, data, record=record, max_pixels=max_pixels) as img:
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
