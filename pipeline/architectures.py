"""The papers' model architectures, known by name: shapes for ``build_model(weights="none")``.

``medpipe params`` and ``medpipe memory`` count the shipped recipes on a machine without their checkpoints:
when a model path is absent on disk, the builder looks its name up here (``/models/phi-2`` -> ``phi-2``)
and builds the same shapes from the architecture's config, saying so. The configs are copied from the
public ``config.json`` files (fields that change a parameter count; the rest keep transformers' defaults).
Training never uses them: a missing path is an error there.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Part = Literal["llm", "vision", "sam"]


@dataclass(frozen=True)
class Architecture:
    name: str
    part: Part  # the model part it is
    config: dict[str, Any]  # HF config fields, ``model_type`` included
    aliases: tuple[str, ...] = ()  # checkpoint folder names (lower case) that are this architecture
    tokenizer_size: int | None = None  # LLMs: len(tokenizer) of the released tokenizer (before our tokens)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN  # vision towers: the processor's statistics
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    note: str = ""  # said in the log line, e.g. how a stand-in differs from the real model

    def hf_config(self) -> Any:
        """The transformers config object of this architecture."""
        from transformers import AutoConfig, CLIPVisionConfig, SamConfig

        spec = dict(self.config)
        model_type = spec.pop("model_type")
        if model_type == "clip_vision_model":
            return CLIPVisionConfig(**spec)
        if model_type == "sam":
            return SamConfig(**spec)
        return AutoConfig.for_model(model_type, **spec)

    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size") or self.config["vision_config"]["image_size"])


def _sam(name: str, *, hidden: int, layers: int, heads: int, global_attn: list[int], aliases: tuple[str, ...]):
    vision = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "global_attn_indexes": global_attn,
        "image_size": 1024,
        "patch_size": 16,
    }
    return Architecture(name, "sam", {"model_type": "sam", "vision_config": vision}, aliases)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "llama-2-7b",
            "llm",
            {
                "model_type": "llama",
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "max_position_embeddings": 4096,
                "tie_word_embeddings": False,
            },
            aliases=("llama-2-7b", "llama-2-7b-hf", "llama-2-7b-chat-hf", "vicuna-7b-v1.5", "llava-v1.5-7b-llm"),
            tokenizer_size=32000,
        ),
        Architecture(
            "phi-2",
            "llm",
            {
                "model_type": "phi",
                "vocab_size": 51200,
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "partial_rotary_factor": 0.4,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
            },
            aliases=("phi-2",),
            tokenizer_size=50295,
        ),
        Architecture(
            "stablelm-2-1.6b",
            "llm",
            {
                "model_type": "stablelm",
                "vocab_size": 100352,
                "hidden_size": 2048,
                "intermediate_size": 5632,
                "num_hidden_layers": 24,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "partial_rotary_factor": 0.25,
                "use_qkv_bias": True,
                "max_position_embeddings": 4096,
                "tie_word_embeddings": False,
            },
            aliases=("stablelm-2-1_6b", "stablelm-2-1.6b"),
            tokenizer_size=100289,
        ),
        Architecture(
            "clip-vit-l-14-336",
            "vision",
            {
                "model_type": "clip_vision_model",
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
            aliases=("clip-vit-large-patch14-336",),
        ),
        Architecture(
            "eva-clip-vit-g-14-224",
            "vision",
            {
                "model_type": "clip_vision_model",
                "hidden_size": 1408,
                "intermediate_size": 6144,
                "num_hidden_layers": 40,
                "num_attention_heads": 16,
                "image_size": 224,
                "patch_size": 14,
            },
            aliases=("timm:eva_giant_patch14_clip_224", "eva_giant_patch14_clip_224", "eva_vit_g"),
            note=(
                "an HF CLIP ViT of EVA-CLIP ViT-g/14's widths and depth standing in for timm's model: 41 x 1408 = "
                "57,728 parameters (<0.01%) more (a key bias per block and a pre-LayerNorm, no patch-embedding bias)"
            ),
        ),
        _sam("sam-vit-h", hidden=1280, layers=32, heads=16, global_attn=[7, 15, 23, 31], aliases=("sam-vit-huge",)),
        _sam("sam-vit-b", hidden=768, layers=12, heads=12, global_attn=[2, 5, 8, 11], aliases=("sam-vit-base",)),
        _sam("medsam-vit-b", hidden=768, layers=12, heads=12, global_attn=[2, 5, 8, 11], aliases=("medsam-vit-base",)),
    )
}


def find_architecture(path: str, part: Part) -> Architecture | None:
    """The built-in architecture a checkpoint path names (its folder name or the architecture's own name)."""
    text = str(path).strip().lower()
    candidates = {text, Path(text).name, Path(text).stem}
    for architecture in ARCHITECTURES.values():
        if architecture.part == part and candidates & ({architecture.name} | set(architecture.aliases)):
            return architecture
    return None


def known_names(part: Part) -> str:
    return ", ".join(a.name for a in ARCHITECTURES.values() if a.part == part)


def architecture_for(key: str, path: str, part: Part, *, reason: str = "not found") -> Architecture:
    """The built-in architecture for a missing ``path`` (config key ``key``), logged in one line; an error
    naming the key and the known architectures when none matches."""
    architecture = find_architecture(path, part)
    if architecture is None:
        raise FileNotFoundError(
            f"{key} {path} {reason}, and its name matches no built-in architecture ({known_names(part)}); "
            "point it at a checkpoint folder"
        )
    note = f"; {architecture.note}" if architecture.note else ""
    say_once(
        f"{key} {path} {reason}: using the built-in {architecture.name} architecture (shapes only, no weights{note})"
    )
    return architecture


@functools.cache
def say_once(message: str) -> None:
    """Log ``message`` once per process (``medpipe memory`` builds one model per stage)."""
    logging.getLogger("medpipe").info(message)
