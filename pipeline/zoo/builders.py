"""What each ``tiny:<name>`` is built by (``tokenizer`` is every tiny LM's, not a model path of its own)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medcore.choices import TINY_LLM_FAMILIES, TINY_MODELS, TINY_TOWERS
from pipeline.zoo.families import llm_builder, tower_builder
from pipeline.zoo.language import lm_builder
from pipeline.zoo.sam import build_medsam, build_sam
from pipeline.zoo.tokenizer import build_tokenizer
from pipeline.zoo.vision import build_clip

BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "tokenizer": build_tokenizer,
    "llama": lm_builder("llama", pretrain_steps=600),
    "qwen2": lm_builder("qwen2", pretrain_steps=0),
    "phi": lm_builder("phi", pretrain_steps=0),
    "stablelm": lm_builder("stablelm", pretrain_steps=0),
    "clip": build_clip,
    "sam": build_sam,
    "medsam": build_medsam,
    **{name: llm_builder(name) for name in TINY_LLM_FAMILIES},
    **{name: tower_builder(name) for name in TINY_TOWERS},
}
if set(BUILDERS) - {"tokenizer"} != set(TINY_MODELS):
    raise ImportError(f"medcore.choices.TINY_MODELS {TINY_MODELS} and the zoo's builders {sorted(BUILDERS)} differ")
