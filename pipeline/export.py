"""``medpipe export``: a trained medpipe model as a folder another tool loads without medpipe.

``hf`` writes a dense LLaVA-shaped model as transformers' ``LlavaForConditionalGeneration`` (config, safetensors
weights, tokenizer with its chat template, ``LlavaProcessor`` with the tower's image processor): the vision
tower, the ``mlp`` connector (``multi_modal_projector.linear_{1,2}``) and the LLM map one to one, every key
accounted for. What transformers' Llava has no place for is refused with the reason: token aggregation other
than ``none``, another connector type, MoE layers, the grounding head, the vision output norm, pad-to-square
preprocessing.

``moe_llava`` writes MoE-LLaVA / Med-MoE's released layout (``export_moe.py``): DeepSpeed MoE keys, the ``moe``
config, the tokenizer; what the released gate computes otherwise is refused naming the setting. ``medpipe``
writes medpipe's own format (``export_medpipe.py``, docs/export.md): ``medpipe_config.json`` + safetensors under
medpipe's key names + the tokenizer, with ``medpipe_loader.py`` beside them, a loader that needs only torch and
transformers (dense and MoE models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXPORT_FORMATS = ("hf", "moe_llava", "medpipe")
EXPORT_HELP = {
    "hf": "transformers' LlavaForConditionalGeneration with tokenizer, chat template and processor (dense "
    "models with the mlp connector and no token pooling)",
    "moe_llava": "MoE-LLaVA / Med-MoE's released layout (DeepSpeed MoE keys, the moe config): what their "
    "evaluation scripts and model.init {format: moe_llava} load",
    "medpipe": "medpipe's own safetensors + JSON config, with medpipe_loader.py (torch and transformers only; dense "
    "and MoE models; docs/export.md)",
}


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why."""


def check_exportable(model_cfg: Any, model: Any) -> None:
    """Refuse, naming the setting, what ``LlavaForConditionalGeneration`` cannot express."""
    from lightningmodules.models.moe import moe_layers

    reasons = []
    if model_cfg.connector.aggregation != "none":
        reasons.append(f"model.connector.aggregation is {model_cfg.connector.aggregation!r} (Llava feeds every patch)")
    if model_cfg.connector.type != "mlp":
        reasons.append(f"model.connector.type is {model_cfg.connector.type!r} (Llava's projector is mlp2x_gelu)")
    if model_cfg.get("grounding") is not None:
        reasons.append("model.grounding is set (Llava has no mask decoder)")
    if model_cfg.vision.get("output_norm"):
        reasons.append("model.vision.output_norm is on (Llava has no norm after the tower)")
    if model_cfg.vision.pad_square:
        reasons.append("model.vision.pad_square is on (Llava's image processor does not pad to a square)")
    if moe_layers(model.llm):
        reasons.append("the LLM has MoE layers (Llava's LLM is dense; --format moe_llava or medpipe write them)")
    if reasons:
        raise ExportError("cannot export as transformers' Llava: " + "; ".join(reasons))


def export_hf(built: Any, model_cfg: Any, out: str | Path, *, vision_path: str | Path | None = None) -> Path:
    """Write ``built`` (a ``BuiltModel``, hand-over already restored) to ``out`` as a transformers Llava folder."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    model = built.model
    check_exportable(model_cfg, model)
    if built.tokenizer is None:
        raise ExportError("the model has no tokenizer files (a built-in architecture): nothing to export with")
    vision, llm = model.vision, model.llm
    config = LlavaConfig(
        vision_config=vision.encoder.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_index=model.image_token_id,
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy="default" if vision.select_feature == "patch" else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=model.num_image_tokens,
    )
    hf = LlavaForConditionalGeneration(config)
    targets = hf.state_dict()
    mapped = {}
    for name, tensor in model.state_dict().items():
        key = _hf_key(name, targets)
        if key is None:
            raise ExportError(f"no place for {name} in transformers' Llava")
        mapped[key] = tensor
    missing = sorted(set(targets) - set(mapped))
    if missing:
        raise ExportError(f"transformers' Llava keys left unfilled: {', '.join(missing[:8])}")
    hf.load_state_dict(mapped, strict=True)
    hf.generation_config = llm.generation_config
    out = Path(out)
    hf.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor_for(vision, vision_path),
        tokenizer=built.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=vision.num_prefix_tokens,
        chat_template=built.tokenizer.chat_template,
    )
    processor.save_pretrained(out)
    return out


def image_processor_for(vision: Any, vision_path: str | Path | None) -> Any:
    """The tower's image processor: its folder's ``preprocessor_config.json``, else CLIP's at the tower's size."""
    from transformers import CLIPImageProcessor

    source = Path(vision_path) if vision_path is not None else None
    if source is not None and (source / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(source)
    size = vision.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_weights(state: dict[str, Any], out: Path, *, max_shard_size: str = "5GB") -> list[Path]:
    """``state`` (no shared storage) as ``model.safetensors``, or shards with ``model.safetensors.index.json``
    above ``max_shard_size`` (transformers' names); returns the files."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    return sorted(out.glob("model*.safetensors"))


def export_model(
    fmt: str, built: Any, model_cfg: Any, out: str | Path, *, vision_path: str | Path | None = None
) -> tuple[Path, list[str]]:
    """Write ``built`` in ``fmt`` (one of ``EXPORT_FORMATS``); returns the folder and notes on what was left out."""
    if fmt == "hf":
        return export_hf(built, model_cfg, out, vision_path=vision_path), []
    if fmt == "moe_llava":
        from pipeline.export_moe import export_moe_llava

        written = export_moe_llava(built, model_cfg, out, vision_path=vision_path)
        return written.out, written.notes
    if fmt == "medpipe":
        from pipeline.export_medpipe import export_medpipe

        written = export_medpipe(built, model_cfg, out, vision_path=vision_path)
        return written.out, written.notes
    raise ExportError(f"--format {fmt!r}: this medpipe writes {', '.join(EXPORT_FORMATS)}")


def _hf_key(name: str, targets: dict[str, Any]) -> str | None:
    """Our state-dict key -> transformers Llava's (>= 4.52 names), checked against its keys."""
    candidates = []
    if name.startswith("llm.model."):
        candidates.append("model.language_model." + name.removeprefix("llm.model."))
    elif name == "llm.lm_head.weight":
        candidates.append("lm_head.weight")
    elif name.startswith("vision.encoder."):
        rest = name.removeprefix("vision.encoder.")
        candidates += [f"model.vision_tower.{rest}", f"model.vision_tower.vision_model.{rest}"]
    elif name.startswith("connector.fc1."):
        candidates.append("model.multi_modal_projector.linear_1." + name.removeprefix("connector.fc1."))
    elif name.startswith("connector.fc2."):
        candidates.append("model.multi_modal_projector.linear_2." + name.removeprefix("connector.fc2."))
    return next((c for c in candidates if c in targets), None)


__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_HELP",
    "ExportError",
    "check_exportable",
    "export_hf",
    "export_model",
    "image_processor_for",
    "save_weights",
]
