"""ImageTransform against HF's CLIP processor, pad-to-square, and load_image's decoding and errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import ImageTransform, load_image, pad_to_square
from datamodules.problems import DataError


@pytest.fixture(scope="module")
def transform(tiny_clip) -> ImageTransform:
    t = ImageTransform.from_pretrained(tiny_clip)
    # the image sizes below (crop excesses, the 64 x 16 band) were chosen for this geometry
    assert t.size == {"shortest_edge": 64} and t.output_size == (64, 64), "tiny CLIP geometry changed"
    return t


@pytest.fixture(scope="module")
def hf_processor(tiny_clip):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(tiny_clip)


def hf_pixels(processor, img: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))


def random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_from_pretrained_reads_the_checkpoint_config(tiny_clip, transform) -> None:
    cfg = json.loads((Path(tiny_clip) / "preprocessor_config.json").read_text())
    assert transform.size == cfg["size"]
    assert transform.crop_size == cfg["crop_size"]
    assert transform.image_mean == pytest.approx(tuple(cfg["image_mean"]))
    assert transform.image_std == pytest.approx(tuple(cfg["image_std"]))
    assert transform.resample == cfg["resample"]
    assert transform.do_center_crop is True
    assert transform.output_size == (cfg["crop_size"]["height"], cfg["crop_size"]["width"])


def test_from_pretrained_without_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageTransform.from_pretrained(tmp_path)


# Sizes whose resized long side minus the crop is even or 1 mod 4: both crop rules agree there.
# (resized long side = int(64 * long / short), crop 64)
@pytest.mark.parametrize(
    "w, h",
    [
        (80, 120),  # -> 64 x 96, excess 32
        (97, 64),  # -> 97 x 64, excess 33 (33 / 2 = 16.5 rounds to 16 = floor)
        (130, 70),  # -> 118 x 64, excess 54
        (200, 90),  # -> 142 x 64, excess 78
        (64, 64),  # square, no crop
        (33, 50),  # upscaled: -> 64 x 96, excess 32
    ],
)
def test_transform_matches_hf_clip_processor(transform, hf_processor, w, h) -> None:
    img = random_image(w, h, seed=w * 1000 + h)
    ours = transform(img)
    ref = hf_pixels(hf_processor, img)
    assert ours.shape == ref.shape == (3, 64, 64)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())


def test_transform_matches_hf_when_excess_is_odd(transform, hf_processor) -> None:
    img = random_image(100, 67, seed=7)
    assert torch.allclose(transform(img), hf_pixels(hf_processor, img), atol=1e-5)


def test_transform_normalisation_on_constant_image(transform) -> None:
    img = Image.new("RGB", (70, 90), (255, 0, 128))
    out = transform(img)
    expected = [
        (1.0 - transform.image_mean[0]) / transform.image_std[0],
        (0.0 - transform.image_mean[1]) / transform.image_std[1],
        (128 / 255 - transform.image_mean[2]) / transform.image_std[2],
    ]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((64, 64), expected[c]), atol=1e-5)


# -- pad to square ----------------------------------------------------------------------------------


def test_pad_to_square_centres_image() -> None:
    img = Image.new("RGB", (6, 2), (10, 20, 30))
    out = pad_to_square(img, (1, 2, 3))
    assert out.size == (6, 6)
    arr = np.asarray(out)
    # (6 - 2) // 2 = 2 fill rows on top, 2 image rows, 2 fill rows below
    assert (arr[:2] == (1, 2, 3)).all() and (arr[4:] == (1, 2, 3)).all()
    assert (arr[2:4] == (10, 20, 30)).all()
    tall = np.asarray(pad_to_square(Image.new("RGB", (3, 8), (9, 9, 9)), (0, 0, 0)))
    assert tall.shape == (8, 8, 3)
    # (8 - 3) // 2 = 2 fill columns left, 3 image columns, 3 fill columns right
    assert (tall[:, :2] == 0).all() and (tall[:, 2:5] == 9).all() and (tall[:, 5:] == 0).all()
    square = Image.new("RGB", (4, 4))
    assert pad_to_square(square, (0, 0, 0)) is square


def test_pad_square_transform_uses_mean_colour(tiny_clip, transform) -> None:
    t = ImageTransform.from_pretrained(tiny_clip, pad_square=True)
    plain = ImageTransform.from_pretrained(tiny_clip)
    img = Image.new("RGB", (64, 16), (255, 255, 255))  # a white band, 64 x 16
    out = t(img)  # padded to 64 x 64: rows 24..39 white, the rest mean colour
    fill = [int(m * 255) for m in t.image_mean]  # LLaVA's expand2square truncates
    for c in range(3):
        expected_fill = (fill[c] / 255 - t.image_mean[c]) / t.image_std[c]
        assert abs(expected_fill) < 0.02  # the (truncated) mean colour normalises to ~0
        assert torch.allclose(out[c, :24], torch.full((24, 64), expected_fill), atol=1e-5)
        assert torch.allclose(out[c, 40:], torch.full((24, 64), expected_fill), atol=1e-5)
        white = (1.0 - t.image_mean[c]) / t.image_std[c]
        assert torch.allclose(out[c, 24:40], torch.full((16, 64), white), atol=1e-5)
    # without pad_square the same image is resized up and cropped: all white
    assert torch.allclose(plain(img)[0], torch.full((64, 64), (1.0 - t.image_mean[0]) / t.image_std[0]), atol=1e-5)


def test_pad_square_fill_matches_llava(tiny_clip, monkeypatch) -> None:
    from datamodules import images

    t = ImageTransform.from_pretrained(tiny_clip, pad_square=True)
    captured = {}
    original = images.pad_to_square

    def spy(img, fill):
        captured["fill"] = fill
        return original(img, fill)

    monkeypatch.setattr(images, "pad_to_square", spy)
    t(Image.new("RGB", (64, 16)))
    assert captured["fill"] == tuple(int(m * 255) for m in t.image_mean)


# -- load_image -------------------------------------------------------------------------------------


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_rgb_png(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (7, 5)
    assert np.array_equal(np.asarray(out), arr)


def test_load_grayscale_png(tmp_path: Path) -> None:
    gray = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "gray.png"
    Image.fromarray(gray, mode="L").save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[..., c], gray)  # L values copied into every channel, unscaled


def test_load_16_bit_png(tmp_path: Path) -> None:
    # values 1000..3000: min-max rescaled to the full 8-bit range
    raw = np.linspace(1000, 3000, 5 * 8).reshape(5, 8).astype(np.uint16)
    path = tmp_path / "ct16.png"
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (5, 8, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    expected = np.round((raw.astype(np.float64) - 1000) / 2000 * 255).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected)
    assert np.array_equal(out[..., 1], out[..., 2])


def test_load_constant_16_bit_png(tmp_path: Path) -> None:
    path = tmp_path / "flat16.png"
    Image.fromarray(np.full((4, 4), 777, dtype=np.uint16)).save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3) and (out == 0).all()


def test_load_from_bytes() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    out = load_image(data=png_bytes(Image.fromarray(arr)), record="b1")
    assert np.array_equal(np.asarray(out), arr)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DataError) as info:
        load_image(path, record="rec-5")
    msg = str(info.value)
    assert str(path) in msg and "rec-5" in msg and "not found" in msg


def test_load_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError) as info:
        load_image(path, record="rec-6")
    assert str(path) in str(info.value) and "rec-6" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_load_truncated_file(tmp_path: Path, fmt: str) -> None:
    arr = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load_image(path, record="rec-7")
    assert str(path) in str(info.value) and "rec-7" in str(info.value)
    with pytest.raises(DataError, match="<bytes>"):
        load_image(data=data[: len(data) // 2])
