"""Loading the real-architecture zoo (``pipeline/zoo/families``) the way the pipeline loads a download."""

from __future__ import annotations

from pathlib import Path

from test_generation_semantics import load

from lightningmodules.models.language import stop_token_ids
from lightningmodules.models.multimodal import MultimodalLM
from medcore.choices import TINY_LLM_FAMILIES
from pipeline.zoo import ensure_tiny

# text that must never reach a decoded answer: every family's template and special tokens
TEMPLATE_TOKENS = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "ASSISTANT:",
    "USER:",
)


def family_path(name: str) -> Path:
    assert name in TINY_LLM_FAMILIES
    return ensure_tiny(name)


def load_family(name: str) -> tuple[MultimodalLM, object]:
    """A text-only MultimodalLM over the family's checkpoint, tokenizer as the runner loads it."""
    return load(family_path(name))


def stops_of(model: MultimodalLM, tokenizer) -> list[int]:
    return model.stop_token_ids(stop_token_ids(tokenizer))
