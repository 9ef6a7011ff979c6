"""Real vision-checkpoint layouts: processor files as the hub ships them, prefix tokens, odd patch grids.

Nothing is downloaded: the processor files are written as the hub files look, the towers are tiny random
HF models of the real classes (CLIP, SigLIP, DINOv2, DINOv2 with registers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.images import ImageTransform
from lightningmodules.models.aggregation import TokenAggregation
from lightningmodules.models.vision import VisionTower

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# -- processor files, as the hub has them -------------------------------------------------------------

PROCESSOR_FILES = {
    # openai/clip-vit-large-patch14-336: int sizes, a feature-extractor name, no rescale keys
    "clip_openai": {
        "crop_size": 336,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "size": 336,
    },
    # the same geometry as save_pretrained writes it today
    "clip_dict": {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 336},
    },
    # google/siglip-so400m-patch14-384: a fixed height x width, no crop
    "siglip": {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    },
    # facebook/dinov2-base (BiT's processor): short side 256, then a 224 centre crop
    "dinov2": {
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor",
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": 256},
    },
}
OUTPUT_SIZES = {"clip_openai": 336, "clip_dict": 336, "siglip": 384, "dinov2": 224}
# portrait, landscape, square, smaller than the crop (upscaled), odd excesses over the crop
IMAGE_SIZES = [(300, 500), (640, 360), (336, 336), (100, 67), (257, 411)]


def random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=sorted(PROCESSOR_FILES))
def processor_dir(request, tmp_path_factory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_FILES[request.param], indent=2))
    return request.param, folder


def test_transform_equals_hf_image_processor(processor_dir) -> None:
    """Pixel values exactly equal to HF's (PIL) image processor's: the same PIL resize, the same crop
    offsets, and rescale in float64 then normalise in float32 as HF rounds (so no tolerance is needed)."""
    from transformers import AutoImageProcessor

    name, folder = processor_dir
    ours = ImageTransform.from_pretrained(folder)
    hf = AutoImageProcessor.from_pretrained(folder, backend="pil")
    side = OUTPUT_SIZES[name]
    assert ours.output_size == (side, side)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        image = random_image(w, h, seed=i)
        reference = torch.as_tensor(np.asarray(hf(image, return_tensors="np")["pixel_values"][0]))
        pixels = ours(image)
        assert pixels.shape == reference.shape == (3, side, side), (name, w, h)
        assert torch.equal(pixels, reference), (name, w, h, float((pixels - reference).abs().max()))


def test_openai_clip_file_reads_int_sizes(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR_FILES["clip_openai"]))
    transform = ImageTransform.from_pretrained(tmp_path)
    assert transform.size == {"shortest_edge": 336}
    assert transform.crop_size == {"height": 336, "width": 336}
    assert transform.do_center_crop and transform.do_rescale and transform.do_normalize


def test_flags_switch_steps_off(tmp_path: Path) -> None:
    """do_resize / do_center_crop / do_rescale / do_normalize false: the step is skipped, as in HF."""
    from transformers import AutoImageProcessor

    settings = dict(PROCESSOR_FILES["clip_dict"], do_resize=False, do_rescale=False, do_normalize=False)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    transform = ImageTransform.from_pretrained(tmp_path)
    image = random_image(400, 350, seed=5)
    reference = np.asarray(AutoImageProcessor.from_pretrained(tmp_path, backend="pil")(image)["pixel_values"][0])
    pixels = transform(image)
    assert pixels.shape == (3, 336, 336)
    assert torch.equal(pixels, torch.as_tensor(reference))
    assert float(pixels.max()) > 1.0  # raw 0..255 values: neither rescaled nor normalised


# -- prefix tokens (CLS, registers, none) ------------------------------------------------------------

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}


def tiny_encoder(family: str, *, image_size: int = 24, patch_size: int = 4):
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    geometry = {"image_size": image_size, "patch_size": patch_size, **SMALL}
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**geometry)).eval()
    if family == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(**geometry)).eval()
    if family == "dinov2":
        return Dinov2Model(Dinov2Config(**geometry)).eval()
    return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **geometry)).eval()


# family -> (CLS, registers) in front of the patch tokens
PREFIXES = {"clip": (1, 0), "siglip": (0, 0), "dinov2": (1, 0), "dinov2_registers": (1, 4)}


@pytest.mark.parametrize("family", sorted(PREFIXES))
@pytest.mark.parametrize("select_layer", [-2, -1])
def test_tower_returns_exactly_the_patch_grid(family: str, select_layer: int) -> None:
    encoder = tiny_encoder(family)
    tower = VisionTower(encoder=encoder, select_layer=select_layer)
    num_cls, num_registers = PREFIXES[family]
    assert (tower.has_cls, tower.num_registers) == (bool(num_cls), num_registers)
    assert tower.grid_size == 6 and tower.num_tokens == 36
    pixels = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        features = tower(pixels)
        hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    assert hidden.shape[1] == num_cls + num_registers + 36
    assert features.shape == (3, 36, 32)
    assert torch.equal(features, hidden[:, num_cls + num_registers :])


@pytest.mark.parametrize("family", ["clip", "dinov2", "dinov2_registers"])
def test_cls_patch_keeps_cls_without_registers(family: str) -> None:
    encoder = tiny_encoder(family)
    tower = VisionTower(encoder=encoder, select_feature="cls_patch")
    prefix = sum(PREFIXES[family])
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        features = tower(pixels)
        hidden = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert tower.num_tokens == 37 and features.shape == (2, 37, 32)
    assert torch.equal(features[:, 0], hidden[:, 0])  # CLS
    assert torch.equal(features[:, 1:], hidden[:, prefix:])  # patches, registers left out


def test_siglip_cls_patch_is_just_the_patches() -> None:
    tower = VisionTower(encoder=tiny_encoder("siglip"), select_feature="cls_patch")
    assert tower.num_tokens == 36
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 24, 24)).shape == (1, 36, 32)


def test_dinov2_grid_follows_the_transform_size() -> None:
    """DINOv2 interpolates its position embeddings: 16 px inputs on a 24 px config give a 4 x 4 grid."""
    encoder = tiny_encoder("dinov2_registers")
    tower = VisionTower(encoder=encoder, image_size=16)
    with torch.no_grad():
        features = tower(torch.randn(2, 3, 16, 16))
    assert tower.grid_size == 4 and features.shape == (2, 16, 32)


def test_wrong_token_count_is_an_error_not_a_shift() -> None:
    tower = VisionTower(encoder=tiny_encoder("dinov2"), image_size=24)
    with pytest.raises(ValueError, match=r"17 tokens per image, expected 1 prefix .* 6x6 patches = 37"):
        tower(torch.randn(1, 3, 16, 16))


# -- odd grids ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, message",
    [
        ("concat4", "concat4 needs a token count divisible by 4 (an even patch grid), the vision tower gives 27x27"),
        ("avgpool", "avgpool needs a square grid divisible by 2, the vision tower gives 27x27"),
        ("maxpool", "maxpool needs a square grid divisible by 2, the vision tower gives 27x27"),
    ],
)
def test_odd_grid_names_the_grid(mode: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        TokenAggregation(mode=mode).output_shape(27 * 27, 8)
    assert str(error.value) == message
    assert TokenAggregation(mode="none").output_shape(27 * 27, 8) == (729, 8)  # an odd grid works unaggregated


@pytest.fixture(scope="module")
def siglip_odd_grid(tmp_path_factory) -> Path:
    """A tiny SigLIP with so400m's 27 x 27 grid (54 px, patch 2) saved as a download looks."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    folder = tmp_path_factory.mktemp("siglip27")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=54, patch_size=2, **SMALL)).save_pretrained(folder)
    processor = dict(PROCESSOR_FILES["siglip"], size={"height": 54, "width": 54})
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.mark.parametrize("mode", ["concat4", "avgpool"])
def test_odd_grid_fails_at_build_before_the_llm_loads(cache_dir, tmp_path, siglip_odd_grid, mode) -> None:
    from pipeline.config import load_config
    from pipeline.config.errors import ConfigError
    from pipeline.model_factory import build_model

    not_an_llm = tmp_path / "llm"  # a folder with no checkpoint: loading it would fail with another error
    not_an_llm.mkdir()
    overrides = [
        f"model.vision.path={siglip_odd_grid}",
        f"model.llm.path={not_an_llm}",
        f"model.connector.aggregation={mode}",
    ]
    cfg = load_config(DEMO, overrides)
    with pytest.raises(ConfigError) as error:
        build_model(cfg.model, cache_dir=cache_dir)
    assert str(error.value).startswith("model.connector.aggregation: ")
    assert "the vision tower gives 27x27" in str(error.value)
    assert "\n" not in str(error.value)
