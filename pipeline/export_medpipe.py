"""``medpipe export --format medpipe``: medpipe's own documented format, loaded without medpipe.

The folder (docs/export.md): ``medpipe_config.json`` (everything the forward needs: the vision tower's
transformers config and feature selection, the image transform, the aggregation, the connector, the LLM's
transformers config, each MoE layer's routing, the image placeholder id and count; plus the structure entries and
medpipe's version for the record), ``model.safetensors`` under medpipe's own state-dict names, the tokenizer,
``preprocessor_config.json``, ``generation_config.json`` and ``medpipe_loader.py``: a copy of
``pipeline/medpipe_loader.py``, which needs only torch and transformers (Pillow for its image transform) and
computes medpipe's logits for dense and MoE models.

Refused, naming the setting: the grounding head and region tokens (MedPLIB: their decoders are not in the loader),
connectors other than ``mlp`` / ``linear`` (Uni-Med's CMoE), towers that are not transformers models (timm),
unmerged expert LoRA. The router stage's modality classifier is left out (not in the forward).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline import medpipe_loader

ALLOWED_PREFIXES = ("vision.encoder.", "vision.output_norm.", "connector.", "llm.")


@dataclass
class MedpipeExport:
    out: Path
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def medpipe_refusals(model_cfg: Any, model: nn.Module, transform: Any) -> list[str]:
    """Why the loader could not compute this model's forward, each naming the setting."""
    from transformers import PreTrainedModel

    reasons = []
    if model_cfg.get("grounding") is not None:
        reasons.append("model.grounding is set (the loader has no mask decoder or region tokens)")
    if model_cfg.connector.type not in ("mlp", "linear"):
        reasons.append(f"model.connector.type is {model_cfg.connector.type!r} (the loader has mlp and linear)")
    if not isinstance(model.vision.encoder, PreTrainedModel):
        reasons.append(f"model.vision.path {model_cfg.vision.path!r} is not a transformers model (timm)")
    if not dataclasses.is_dataclass(transform):
        reasons.append("the image transform is not medpipe's ImageTransform")
    for name in model.state_dict():
        if ".lora" in name:
            reasons.append(f"{name} is an unmerged LoRA adapter (merge it first)")
            break
    return reasons


def moe_layer_specs(model: nn.Module) -> list[dict[str, Any]]:
    """Each MoE layer's routing and expert shapes, as ``medpipe_loader.MoEFeedForward`` reads them."""
    from lightningmodules.models.moe import moe_layers

    specs = []
    for name, layer in moe_layers(model.llm):
        experts, router, capacity = layer.experts, layer.router, layer.capacity
        specs.append(
            {
                "layer": int(name.split(".")[-2]),  # model.layers.<i>.mlp
                "num_experts": experts.num_experts,
                "hidden_size": experts.hidden_size,
                "ffn_size": experts.ffn_size,
                "out_size": experts.out_size,
                "gated": experts.gated,
                "activation": experts.activation_name,
                "bias": experts.has_bias,
                "top_k": router.top_k,
                "renormalize": router.renormalize,
                "router_bias": router.linear.bias is not None,
                "meta_expert": layer.meta_expert is not None,
                "capacity": None
                if capacity is None
                else {
                    "factor": capacity.factor,
                    "eval_factor": capacity.eval_factor,
                    "min_capacity": capacity.min_capacity,
                    "drop": capacity.drop,
                },
            }
        )
    return specs


def medpipe_config(built: Any, model_cfg: Any) -> dict[str, Any]:
    """``medpipe_config.json`` of a built model (module docstring)."""
    from pipeline.structure import model_structure

    model = built.model
    vision, llm = model.vision, model.llm
    in_dim = (model.connector.fc1 if model_cfg.connector.type == "mlp" else model.connector.proj).in_features
    llm_config = llm.config.to_dict()
    llm_config["vocab_size"] = int(llm.get_input_embeddings().weight.shape[0])
    for key in ("transformers_version", "architectures", "auto_map"):
        llm_config.pop(key, None)
    vision_config = vision.encoder.config.to_dict()
    vision_config.pop("transformers_version", None)
    return {
        "format": medpipe_loader.FORMAT,
        "format_version": medpipe_loader.FORMAT_VERSION,
        "vision": {
            "config": vision_config,
            "hidden_size": vision.hidden_size,
            "select_layer": vision.select_layer,
            "select_feature": vision.select_feature,
            "num_prefix_tokens": vision.num_prefix_tokens,
            "has_cls": vision.has_cls,
            "output_norm": vision.output_norm is not None,
        },
        "image_transform": dataclasses.asdict(built.transform),
        "aggregation": {"mode": model_cfg.connector.aggregation, "pool": int(model_cfg.connector.pool)},
        "connector": {"type": model_cfg.connector.type, "in_dim": int(in_dim), "out_dim": int(llm.config.hidden_size)},
        "llm": {"config": llm_config},
        "image_token_id": int(model.image_token_id),
        "num_image_tokens": int(model.num_image_tokens),
        "moe_layers": moe_layer_specs(model),
        "record": {"medpipe_version": _version(), "structure": model_structure(model)},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medpipe")
    except PackageNotFoundError:
        return "unknown"


def export_medpipe(
    built: Any, model_cfg: Any, out: str | Path, *, vision_path: str | Path | None = None
) -> MedpipeExport:
    """Write ``built`` (hand-over restored) to ``out`` in the ``medpipe`` format; :class:`pipeline.export.ExportError`
    with every reason when the loader could not compute it."""
    from pipeline.export import ExportError, image_processor_for, save_weights

    model = built.model
    reasons = medpipe_refusals(model_cfg, model, built.transform)
    if reasons:
        raise ExportError("cannot export in the medpipe format: " + "; ".join(reasons))
    notes = []
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("modality_classifier."):
            continue
        if not name.startswith(ALLOWED_PREFIXES):
            raise ExportError(f"cannot export in the medpipe format: no place for {name} in the loader")
        state[name] = tensor.detach().contiguous().clone()  # no shared storage (tied embeddings) in safetensors
    if hasattr(model, "modality_classifier"):
        notes.append("the modality classifier is left out (it initialises the routers; not in the forward)")
    config = medpipe_config(built, model_cfg)
    out = Path(out)
    out.mkdir(parents=True)
    save_weights(state, out)
    (out / medpipe_loader.CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    shutil.copy(Path(medpipe_loader.__file__), out / "medpipe_loader.py")
    if built.tokenizer is not None:
        built.tokenizer.save_pretrained(out)
    else:
        notes.append("no tokenizer files (a built-in architecture): pass token ids to the loader")
    if getattr(model.llm, "generation_config", None) is not None:
        model.llm.generation_config.save_pretrained(out)
    image_processor_for(model.vision, vision_path).save_pretrained(out)
    return MedpipeExport(out=out, config=config, notes=notes)


__all__ = ["MedpipeExport", "export_medpipe", "medpipe_config", "medpipe_refusals", "moe_layer_specs"]
