"""LLaVA-1.5 checkpoints in their two layouts, into medpipe's vision tower + connector + LLM.

``llava`` - the original release (github.com/haotian-liu/LLaVA, ``LlavaLlamaForCausalLM``; LLaVA-Med v1.5's
``LlavaMistralForCausalLM`` has the same layout): a Llama / Mistral checkpoint whose ``config.json`` adds
``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``image_aspect_ratio``; weights ``model.*`` and ``lm_head.weight`` of the LLM, ``model.mm_projector.{0,2}``
(``mlp2x_gelu``) or ``model.mm_projector`` (``linear``), and optionally the CLIP tower under
``model.vision_tower.vision_tower.vision_model.*`` (``vision_model.`` absent when saved by transformers 5;
the released folders usually leave the tower out: it then comes from ``model.vision.path``, the CLIP folder
``mm_vision_tower`` names).

``hf_llava`` - transformers' ``LlavaForConditionalGeneration``: ``model.language_model.*``, ``lm_head``,
``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.linear_{1,2}`` (transformers >= 4.52), or
the earlier ``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``,
``multi_modal_projector.*`` (the llava-hf folders on the hub); ``config.json`` has ``text_config``,
``vision_config``, ``vision_feature_layer``, ``vision_feature_select_strategy``, ``image_token_index``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.importers.keymap import CheckpointLayoutError, Rule

ROTARY = Rule(r".*\.rotary_emb\.inv_freq", None, "rotary frequencies (a buffer transformers recomputes)")

LLAVA_RULES = [
    Rule(r"model\.mm_projector\.0\.(weight|bias)", r"connector.fc1.\1"),
    Rule(r"model\.mm_projector\.2\.(weight|bias)", r"connector.fc2.\1"),
    Rule(r"model\.mm_projector\.(weight|bias)", r"connector.proj.\1"),
    # transformers < 5 named the tower's parameters vision_model.*, 5.x without that level: both accepted
    Rule(r"model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)", r"vision.encoder.\1"),
    ROTARY,
    Rule(r"model\.(?!mm_projector\.|vision_tower\.)(.+)(?<!\.inv_freq)", r"llm.model.\1"),
    Rule(r"lm_head\.weight", r"llm.lm_head.weight"),
]

HF_LLAVA_RULES = [
    # transformers >= 4.52
    Rule(r"model\.language_model\.(.+)(?<!\.inv_freq)", r"llm.model.\1"),
    Rule(r"lm_head\.weight", r"llm.lm_head.weight"),
    Rule(r"model\.vision_tower\.(?:vision_model\.)?(.+)", r"vision.encoder.\1"),
    Rule(r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"connector.fc1.\1"),
    Rule(r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"connector.fc2.\1"),
    # earlier transformers (the llava-hf folders)
    Rule(r"language_model\.model\.(.+)(?<!\.inv_freq)", r"llm.model.\1"),
    Rule(r"language_model\.lm_head\.weight", r"llm.lm_head.weight"),
    Rule(r"vision_tower\.(?:vision_model\.)?(.+)", r"vision.encoder.\1"),
    Rule(r"multi_modal_projector\.linear_1\.(weight|bias)", r"connector.fc1.\1"),
    Rule(r"multi_modal_projector\.linear_2\.(weight|bias)", r"connector.fc2.\1"),
    ROTARY,
]

# LLaVA's model types -> the transformers model type of their LLM
LLAVA_LLM_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral", "llava": None}
PROJECTORS = {"mlp2x_gelu": "mlp", "linear": "linear"}
SELECT_STRATEGIES = {"default": "patch", "full": "cls_patch"}


def is_original_llava(config: dict[str, Any]) -> bool:
    return config.get("model_type") in ("llava_llama", "llava_mistral") or "mm_projector_type" in config


def llm_config_dict(config: dict[str, Any]) -> dict[str, Any] | None:
    """The LLM's transformers config (as a dict with its ``model_type``) inside a LLaVA ``config.json`` in
    either layout; None for any other checkpoint."""
    if config.get("model_type") == "llava" and isinstance(config.get("text_config"), dict):
        return dict(config["text_config"])
    if is_original_llava(config):
        base = LLAVA_LLM_TYPES.get(config.get("model_type"), None) or "llama"
        fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in ("architectures",)}
        for key in ("image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter"):
            fields.pop(key, None)
        return {**fields, "model_type": base}
    return None


def vision_config_dict(config: dict[str, Any]) -> dict[str, Any] | None:
    """The vision tower's config inside an ``hf_llava`` ``config.json``; None otherwise."""
    if config.get("model_type") == "llava" and isinstance(config.get("vision_config"), dict):
        return dict(config["vision_config"])
    return None


def check_settings(layout: str, config: dict[str, Any], model_cfg: Any, path: Path) -> None:
    """The checkpoint's vision / projector settings must be the config's: a mismatch names the config key."""
    if layout == "llava":
        expected = {
            "model.connector.type": PROJECTORS.get(config.get("mm_projector_type", "linear"), "?"),
            "model.vision.select_layer": config.get("mm_vision_select_layer", -2),
            "model.vision.select_feature": {"patch": "patch", "cls_patch": "cls_patch"}.get(
                config.get("mm_vision_select_feature", "patch"), "?"
            ),
            "model.vision.pad_square": config.get("image_aspect_ratio", "square") == "pad",
        }
        sources = {
            "model.connector.type": "mm_projector_type",
            "model.vision.select_layer": "mm_vision_select_layer",
            "model.vision.select_feature": "mm_vision_select_feature",
            "model.vision.pad_square": "image_aspect_ratio",
        }
    else:
        expected = {
            "model.connector.type": "mlp",
            "model.vision.select_layer": config.get("vision_feature_layer", -2),
            "model.vision.select_feature": SELECT_STRATEGIES.get(config.get("vision_feature_select_strategy"), "?"),
        }
        sources = {
            "model.connector.type": "multi_modal_projector",
            "model.vision.select_layer": "vision_feature_layer",
            "model.vision.select_feature": "vision_feature_select_strategy",
        }
        if config.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointLayoutError(
                f"{path}: projector_hidden_act {config['projector_hidden_act']!r}; medpipe's mlp connector is GELU"
            )
    actual = {
        "model.connector.type": model_cfg.connector.type,
        "model.vision.select_layer": model_cfg.vision.select_layer,
        "model.vision.select_feature": model_cfg.vision.select_feature,
        "model.vision.pad_square": model_cfg.vision.pad_square,
    }
    for key, value in expected.items():
        if actual[key] != value:
            raise CheckpointLayoutError(
                f"{key}: {actual[key]!r}, but {path / 'config.json'} has {sources[key]} = "
                f"{config.get(sources[key])!r} (set {key}: {value!r})"
            )
    if model_cfg.connector.aggregation != "none":
        raise CheckpointLayoutError(
            f"model.connector.aggregation: {model_cfg.connector.aggregation!r}; LLaVA feeds every patch token "
            "(set model.connector.aggregation: none)"
        )


def rules_for(layout: str) -> list[Rule]:
    return LLAVA_RULES if layout == "llava" else HF_LLAVA_RULES


def has_vision_weights(layout: str, keys: list[str]) -> bool:
    prefixes = ("model.vision_tower.vision_tower.",) if layout == "llava" else ("model.vision_tower.", "vision_tower.")
    return any(key.startswith(prefixes) for key in keys)
