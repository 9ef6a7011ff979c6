"""Every family of the real-architecture zoo loads as a download would and behaves as its reference does.

Per LLM family: the folder is the family's layout (tokenizer class, special tokens, template, generation
config), the training loss equals the HF model's own loss (soft-capping included), greedy generation equals
HF's greedy with the checkpoint's sampling settings switched off, batched answers equal one-at-a-time answers,
and generation stops at the family's end-of-turn token. Per vision tower: pixels equal HF's image processor
and the tower returns exactly the patch grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from zoo_helpers import TEMPLATE_TOKENS, family_path, load_family, stops_of

from lightningmodules.models.language import decode_answers, end_of_turn_token_id
from lightningmodules.models.multimodal import IGNORE_INDEX
from medcore.choices import TINY_LLM_FAMILIES, TINY_TOWERS
from pipeline.zoo import ensure_tiny
from pipeline.zoo.families import LLM_FAMILIES, TOWER_FAMILIES

QUESTIONS = [
    "The scan shows a CT of the chest.\nWhich organ is abnormal?",
    "Is this an MRI?",
    "The scan shows an X-Ray of the head with two lesions.\nHow many lesions are there?",
]
# the token each family's chat ends a turn with (eos for families without a template: the default's)
END_OF_TURN = {
    "llama2-chat": "</s>",
    "vicuna": "</s>",
    "mistral-instruct": "</s>",
    "phi2": "<|endoftext|>",
    "stablelm2": "<|endoftext|>",
    "qwen2-instruct": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma2-it": "<end_of_turn>",
    "llama3-instruct": "<|eot_id|>",
}
TOKENIZER_CLASS = {
    "llama2-chat": "LlamaTokenizer",
    "vicuna": "LlamaTokenizer",
    "mistral-instruct": "LlamaTokenizer",
    "phi2": "CodeGenTokenizer",
    "stablelm2": "GPT2Tokenizer",
    "qwen2-instruct": "Qwen2Tokenizer",
    "qwen3": "Qwen2Tokenizer",
    "gemma2-it": "GemmaTokenizer",
    "llama3-instruct": "PreTrainedTokenizerFast",
}


def prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


@pytest.mark.parametrize("name", TINY_LLM_FAMILIES)
def test_folder_is_the_family_download_layout(name: str) -> None:
    from transformers import AutoConfig

    path = family_path(name)
    family = LLM_FAMILIES[name]
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == TOKENIZER_CLASS[name]
    assert (path / "chat_template.jinja").is_file() == (family.template is not None)
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation.keys() == family.generation.keys()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == family.model_type
    for key, value in family.config.items():
        if key != "attn_implementation":  # a load-time choice, not saved
            # transformers 5 keeps rope settings in rope_parameters
            saved = getattr(config, key) if hasattr(config, key) else config.rope_parameters[key]
            assert saved == value, (name, key)


@pytest.mark.parametrize("name", TINY_LLM_FAMILIES)
def test_training_loss_equals_the_family_models_own_loss(name: str) -> None:
    model, tokenizer = load_family(name)
    rows = prompts(tokenizer, QUESTIONS)
    answers = [tokenizer(" yes" + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for _ in rows]
    sequences = [r + a for r, a in zip(rows, answers, strict=True)]
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])  # (B, T)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])  # (B, T)
    labels = torch.tensor(
        [
            [IGNORE_INDEX] * len(r) + a + [IGNORE_INDEX] * (width - len(r) - len(a))
            for r, a in zip(rows, answers, strict=True)
        ]
    )  # (B, T)
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        reference = model.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (name, float(ours), float(reference))


@pytest.mark.parametrize("name", TINY_LLM_FAMILIES)
def test_generation_is_hf_greedy_batched_equals_single_and_stops_at_end_of_turn(name: str) -> None:
    model, tokenizer = load_family(name)
    stops = stops_of(model, tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[name])
    assert end_of_turn in stops
    if LLM_FAMILIES[name].template is not None:
        assert end_of_turn_token_id(tokenizer) == end_of_turn
    rows = prompts(tokenizer, QUESTIONS)
    settings = {"max_new_tokens": 24, "eos_token_id": stops, "pad_token_id": tokenizer.pad_token_id}
    batched = model.generate(*left_padded(rows, tokenizer.pad_token_id), **settings)  # (B, K)
    for row, answer in zip(rows, batched, strict=True):
        ids = torch.tensor([row])  # (1, T)
        single = model.generate(ids, torch.ones_like(ids), **settings)[0]
        reference = model.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            repetition_penalty=1.0,
            max_new_tokens=24,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )[0, ids.shape[1] :]
        n = len(reference)
        assert single[:n].tolist() == reference.tolist(), name
        assert answer[:n].tolist() == reference.tolist(), name
        assert int(reference[-1]) in stops, f"{name}: no stop token within 24 new tokens"
    texts = decode_answers(tokenizer, batched, stops)
    assert any(texts), name  # an empty answer is a stop right away: allowed, but not for every question
    for text in texts:
        assert not any(token in text for token in TEMPLATE_TOKENS), (name, text)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (80, 50), (37, 91)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("name", TINY_TOWERS)
def test_tower_pixels_equal_hf_and_tokens_are_the_patch_grid(name: str) -> None:
    from transformers import AutoImageProcessor

    from datamodules.images import ImageTransform
    from lightningmodules.models.vision import VisionTower, load_vision_model

    path = ensure_tiny(name)
    transform = ImageTransform.from_pretrained(path)
    reference = AutoImageProcessor.from_pretrained(path, backend="pil")
    images = _images()
    ours = torch.stack([transform(image) for image in images])  # (B, 3, H, W)
    theirs = reference(images=images, return_tensors="pt")["pixel_values"]
    assert torch.equal(ours, theirs), name
    grid = TOWER_FAMILIES[name].grid
    tower = VisionTower(encoder=load_vision_model(path), select_layer=-2, image_size=ours.shape[-1]).eval()
    with torch.no_grad():
        tokens = tower(ours)  # (B, grid*grid, D)
        hidden = tower.encoder(pixel_values=ours, output_hidden_states=True).hidden_states[-2]
    assert tokens.shape[1] == grid * grid == tower.num_patches
    assert torch.equal(tokens, hidden[:, hidden.shape[1] - grid * grid :])  # prefix tokens (CLS, registers) dropped


@pytest.mark.parametrize("aggregation", ["concat4", "avgpool", "none"])
def test_odd_grid_tower_fails_in_preflight_naming_the_key_or_runs_unaggregated(aggregation: str, tmp_path) -> None:
    """SigLIP with an odd grid: pooling aggregations stop the run in the pre-flight check (before any
    weights load or MLflow opens) naming ``model.connector.aggregation`` and the grid; ``none`` passes."""
    from pipeline.config import load_config
    from pipeline.config.errors import ConfigError
    from pipeline.preflight import preflight

    demo = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"
    overrides = [
        f"output_dir={tmp_path}/out",
        "model.vision.path=tiny:siglip-odd",
        f"model.connector.aggregation={aggregation}",
    ]
    cfg = load_config(demo, overrides)
    if aggregation == "none":
        preflight(cfg)
        return
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    message = str(error.value)
    assert message.startswith("model.connector.aggregation: ") and "3x3" in message and "\n" not in message
