"""``medpipe export --format moe_llava``: a medpipe model in MoE-LLaVA / Med-MoE's released layout.

The folder is what ``save_pretrained`` of ``MoELLaVA<LLM>ForCausalLM`` writes (the layout
``pipeline/importers/moe_llava.py`` reads, with the sources it cites): ``config.json`` with the LLM's own
fields (transformers 4.37 names: ``rope_theta`` / ``partial_rotary_factor`` at the top level; StableLM also under
Med-MoE's ``StableLMEpochConfig`` names ``rope_pct`` / ``norm_eps``), ``model_type`` ``moe_llava_<llm>`` (or the
dense stage-2 type ``llava_<llm>`` for a model without MoE layers), the ``moe`` dict (``moe_enable``,
``moe_layers_idx``, ``num_experts`` per layer, ``top_k_experts``, ``capacity_factor``, ``eval_capacity_factor``,
``min_capacity``, ``use_residual``, ``ep_size``, ``router_aux_loss_coef``, ...) and the vision fields
(``mm_image_tower``, ``image_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
``image_aspect_ratio``, ``mm_hidden_size``); ``model.safetensors`` (sharded above 5 GB) under the released key
names: the LLM's ``model.*`` / ``lm_head.*``, ``model.mm_projector.image_spatial_proj.{0,2}`` (``mlp2x_gelu``) or
``.image_spatial_proj`` (``linear``), the CLIP tower ``model.image_tower.image_tower.vision_model.*``, and in each
MoE layer DeepSpeed's ``mlp.deepspeed_moe.gate.wg``, ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}.*`` (each
expert an ``nn.Linear`` FFN: ``gate_proj`` / ``up_proj`` / ``down_proj``, or Phi's ``fc1`` / ``fc2``) and Med-MoE's
meta expert ``mlp.meta_moe.*``; the tokenizer (with medpipe's added tokens: the embedding keeps their rows),
``generation_config.json`` and the tower's ``preprocessor_config.json``.

Which released code computes what medpipe computes decides what is written, and what is refused:

- With the meta expert the model is Med-MoE's: its MoE layers hard-code a dropless gate
  (``capacity_factor=4``, ``drop_tokens=False``) and a router ``Linear`` with bias. A medpipe MoE with a capacity
  is refused; a router without bias is written with a zero bias (the same scores).
- Without the meta expert it is MoE-LLaVA's: DeepSpeed 0.9.5's gate (no bias) with the config's capacity over the
  flattened micro-batch, top-1 dropping a random subset, top-2 the later assignments, top-2 renormalised. A
  dropless medpipe MoE, another drop policy, a capacity that skips padding, or a router with bias is refused.
- Both: top-1 weights are the chosen probability (``renormalize`` off), top-2 renormalised (on); CLIP towers only
  (MoE-LLaVA's SigLIP tower drops the first patch token; medpipe's SigLIP has no prefix token to drop); the
  ``mlp`` or ``linear`` connector on every patch token (no pooling), no norm after the tower, no grounding head;
  LLMs Phi, StableLM, Llama, Mistral, Qwen2 (MoE-LLaVA's ``qwen1_5``).

Left out, with a note: the router stage's modality classifier (trains the router init, not in the forward) and
training-only settings MoE-LLaVA has no field for (``z_loss_coef``, ``jitter``). As in the import: DeepSpeed's
top-2 gate draws its second choice with Gumbel noise (medpipe: the second-best probability).

The released ``load_pretrained_model`` (``moellava/model/builder.py``) picks the model class from the folder's
*name*: it should contain ``llava``, ``moe`` and the LLM's name (e.g. ``llava-moe-phi2``); MoE-LLaVA's tower
builder accepts ``mm_image_tower`` names starting ``openai`` / ``laion`` / ``google`` (Med-MoE's also an existing
path): set ``mm_image_tower`` in ``config.json`` if the run's ``model.vision.path`` is not one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# transformers' model_type of the LLM -> MoE-LLaVA's name in moe_llava_<llm> (importers/moe_llava.py LLM_TYPES)
LLM_KINDS = {"phi": "phi", "stablelm": "stablelm", "llama": "llama", "mistral": "mistral", "qwen2": "qwen1_5"}
PROJECTORS = {"mlp": "mlp2x_gelu", "linear": "linear"}
CLIP_TYPES = ("clip", "clip_vision_model")
TOWER = "model.image_tower.image_tower.vision_model."
DEEPSPEED = "deepspeed_moe"


@dataclass
class MoELLaVAExport:
    """What :func:`export_moe_llava` wrote: the folder, the ``moe`` config (None for a dense model) and notes on
    what was left out or changed."""

    out: Path
    moe: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def _moe_entries(model: nn.Module) -> list[dict[str, Any]]:
    from pipeline.structure import model_structure, moe_entry

    return [
        moe_entry(**{k: v for k, v in e.items() if k != "kind"}) for e in model_structure(model) if e["kind"] == "moe"
    ]


def moe_llava_refusals(model_cfg: Any, model: nn.Module) -> tuple[list[str], list[str]]:
    """(reasons the model cannot be written in MoE-LLaVA's layout, each naming the setting; notes on what is
    written differently or left out)."""
    from lightningmodules.models.moe import moe_layers

    reasons, notes = [], []
    if model_cfg.connector.aggregation != "none":
        reasons.append(
            f"model.connector.aggregation is {model_cfg.connector.aggregation!r} (MoE-LLaVA feeds every patch)"
        )
    if model_cfg.connector.type not in PROJECTORS:
        reasons.append(
            f"model.connector.type is {model_cfg.connector.type!r} (MoE-LLaVA's projectors: mlp2x_gelu, linear)"
        )
    if model_cfg.get("grounding") is not None:
        reasons.append("model.grounding is set (MoE-LLaVA has no mask decoder)")
    if model_cfg.vision.get("output_norm"):
        reasons.append("model.vision.output_norm is on (MoE-LLaVA has no norm after the tower)")
    tower_type = getattr(model.vision.encoder.config, "model_type", "")
    if tower_type not in CLIP_TYPES:
        reasons.append(
            f"the vision tower is {tower_type!r} (MoE-LLaVA's CLIP tower; its SigLIP tower drops the first patch token)"
        )
    llm_type = getattr(model.llm.config, "model_type", "")
    if llm_type not in LLM_KINDS:
        reasons.append(f"the LLM is {llm_type!r} (MoE-LLaVA's LLMs here: {', '.join(LLM_KINDS)})")
    entries = _moe_entries(model)
    settings = [{k: v for k, v in e.items() if k != "layers"} for e in entries]
    if any(s != settings[0] for s in settings[1:]):
        reasons.append("the model's moe entries differ in their settings (MoE-LLaVA has one moe config)")
    if entries:
        reasons += _moe_reasons(entries[0], notes)
    layers = sorted(i for e in entries for i in e["layers"])
    found = sorted(int(name.split(".")[-2]) for name, _ in moe_layers(model.llm))
    if layers != found:
        reasons.append(f"MoE layers {found} are not those its structure records ({layers})")
    if hasattr(model, "modality_classifier"):
        notes.append("the modality classifier is left out (it initialises the routers; not in the forward)")
    return reasons, notes


def _moe_reasons(entry: dict[str, Any], notes: list[str]) -> list[str]:
    """What one medpipe ``moe`` entry says that the released gate computes otherwise."""
    reasons = []
    top_k = entry["top_k"]
    if top_k not in (1, 2):
        reasons.append(f"moe.top_k is {top_k} (DeepSpeed's gate has top-1 and top-2)")
    elif entry["renormalize"] != (top_k == 2):
        reasons.append(
            f"moe.renormalize is {str(entry['renormalize']).lower()} with top_k {top_k} (DeepSpeed renormalises "
            "top-2 weights, never top-1)"
        )
    if entry["meta_expert"]:  # Med-MoE: dropless, router with bias
        if entry["capacity_factor"] is not None:
            reasons.append(
                f"moe.capacity_factor is {entry['capacity_factor']} with the meta expert (Med-MoE's MoE layers are "
                "dropless: drop_tokens=False)"
            )
        if not entry["router_bias"]:
            notes.append("the routers have no bias: written as Med-MoE's gate.wg with a zero bias (same scores)")
    else:  # MoE-LLaVA: DeepSpeed 0.9.5's gate with capacity
        if entry["capacity_factor"] is None:
            reasons.append(
                "moe.capacity_factor is null (dropless) without the meta expert (MoE-LLaVA's DeepSpeed gate always "
                "drops by capacity; Med-MoE's dropless layers have a meta expert)"
            )
        else:
            policy = "random" if top_k == 1 else "position"
            if entry["drop_policy"] != policy:
                reasons.append(
                    f"moe.drop_policy is {entry['drop_policy']!r} (DeepSpeed's top-{top_k} gate drops {policy!r})"
                )
            if not entry["capacity_counts_padding"]:
                reasons.append("moe.capacity_counts_padding is false (DeepSpeed's gate counts the padding)")
        if entry["router_bias"]:
            reasons.append("moe.router_bias is true without the meta expert (MoE-LLaVA's gate wg has no bias)")
    for name in ("z_loss_coef", "jitter"):
        if entry[name]:
            notes.append(f"moe.{name} {entry[name]} left out (training only; MoE-LLaVA has no such setting)")
    if top_k == 2:
        notes.append("top-2: DeepSpeed draws the second expert with Gumbel noise; medpipe takes the second best")
    return reasons


def moe_config(entries: list[dict[str, Any]], model: nn.Module) -> dict[str, Any] | None:
    """MoE-LLaVA's ``config.moe`` for the model's MoE layers (``initialize_moe_modules`` writes these fields)."""
    from lightningmodules.models.moe import moe_layers

    if not entries:
        return None
    entry = entries[0]
    layers = dict(moe_layers(model.llm))
    indices = sorted(i for e in entries for i in e["layers"])
    counts = [layers[f"model.layers.{i}.mlp"].num_experts for i in indices]
    factor = entry["capacity_factor"]
    if factor is None:  # Med-MoE: the model hard-codes 4 and drop_tokens=False; its config keeps the defaults
        factor, eval_factor, minimum = 1.0, 1.0, 0
    else:
        eval_factor = entry["eval_capacity_factor"] if entry["eval_capacity_factor"] is not None else factor
        minimum = entry["min_capacity"]
    return {
        "moe_enable": True,
        "moe_mode": "custom",
        "moe_layers_idx": indices,
        "ep_size": 1,
        "top_k_experts": entry["top_k"],
        "capacity_factor": float(factor),
        "eval_capacity_factor": float(eval_factor),
        "min_capacity": int(minimum),
        "use_residual": False,
        "router_aux_loss_coef": float(entry["aux_loss_coef"]),
        "train_modules": ["fc1", "fc2", "wg"] if not layers[f"model.layers.{indices[0]}.mlp"].experts.gated
        else ["gate_proj", "up_proj", "down_proj", "wg"],
        "num_experts": counts,
    }  # fmt: skip


# -- weights ---------------------------------------------------------------------------------------

_LAYER = re.compile(r"llm\.model\.layers\.(\d+)\.mlp\.(router\.linear|experts|meta_expert)\.(.+)")


def moe_llava_state_dict(model: nn.Module, *, zero_router_bias: bool) -> dict[str, torch.Tensor]:
    """The model's tensors under MoE-LLaVA's key names (stacked experts split into per-expert Linears); every key
    placed, else :class:`pipeline.export.ExportError` naming it."""
    from lightningmodules.models.moe import moe_layers
    from pipeline.export import ExportError

    experts = {f"llm.{name}": layer.experts for name, layer in moe_layers(model.llm)}
    source = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in source.items():
        tensor = tensor.detach()
        if name.startswith("modality_classifier."):
            continue  # left out (moe_llava_refusals notes it)
        match = _LAYER.fullmatch(name)
        if match is not None:
            index, part, rest = match.groups()
            base = f"model.layers.{index}.mlp"
            if part == "router.linear":
                out[f"{base}.{DEEPSPEED}.gate.wg.{rest}"] = tensor
                if zero_router_bias and rest == "weight" and name.removesuffix("weight") + "bias" not in source:
                    out[f"{base}.{DEEPSPEED}.gate.wg.bias"] = tensor.new_zeros(tensor.shape[0])  # (E,)
            elif part == "meta_expert":
                out[f"{base}.meta_moe.{rest}"] = tensor
            elif rest in ("w_in", "w_out", "b_in", "b_out"):
                split = _split_experts(
                    experts[f"llm.{base}"], rest, tensor, f"{base}.{DEEPSPEED}.experts.deepspeed_experts"
                )
                out |= split
            else:
                raise ExportError(f"no place for {name} in MoE-LLaVA's layout (merge expert LoRA first)")
        elif name.startswith("llm.model."):
            out["model." + name.removeprefix("llm.model.")] = tensor
        elif name.startswith("llm.lm_head."):
            out["lm_head." + name.removeprefix("llm.lm_head.")] = tensor
        elif name.startswith("vision.encoder."):
            out[TOWER + name.removeprefix("vision.encoder.").removeprefix("vision_model.")] = tensor
        elif name.startswith("connector.fc1."):
            out["model.mm_projector.image_spatial_proj.0." + name.removeprefix("connector.fc1.")] = tensor
        elif name.startswith("connector.fc2."):
            out["model.mm_projector.image_spatial_proj.2." + name.removeprefix("connector.fc2.")] = tensor
        elif name.startswith("connector.proj."):
            out["model.mm_projector.image_spatial_proj." + name.removeprefix("connector.proj.")] = tensor
        else:
            raise ExportError(f"no place for {name} in MoE-LLaVA's layout")
    return {k: v.contiguous().clone() for k, v in out.items()}  # no shared storage (tied embeddings) in safetensors


def _split_experts(experts: nn.Module, part: str, stacked: torch.Tensor, base: str) -> dict[str, torch.Tensor]:
    """One stacked tensor of a ``GroupedExperts`` -> expert e's ``nn.Linear`` tensors (out, in), named as the dense
    FFN names them (gated ``[gate | up]`` in ``w_in``; ungated ``fc1`` / ``fc2``)."""
    inputs, output = (("gate_proj", "up_proj"), "down_proj") if experts.gated else (("fc1",), "fc2")
    f = experts.ffn_size
    out = {}
    for e in range(stacked.shape[0]):
        if part == "w_in":  # (E, D, 2F|F): matmul layout, [gate | up] side by side
            for i, proj in enumerate(inputs):
                out[f"{base}.{e}.{proj}.weight"] = stacked[e, :, i * f : (i + 1) * f].t()  # (F, D)
        elif part == "b_in":  # (E, 2F|F)
            for i, proj in enumerate(inputs):
                out[f"{base}.{e}.{proj}.bias"] = stacked[e, i * f : (i + 1) * f]  # (F,)
        elif part == "w_out":  # (E, F, O)
            out[f"{base}.{e}.{output}.weight"] = stacked[e].t()  # (O, F)
        else:  # b_out (E, O)
            out[f"{base}.{e}.{output}.bias"] = stacked[e]  # (O,)
    return out


# -- config ----------------------------------------------------------------------------------------


def llm_fields(config: Any, vocab_rows: int) -> dict[str, Any]:
    """The LLM config under transformers 4.37's names (what MoE-LLaVA's ``PhiConfig`` / ``LlamaConfig`` ... read)."""
    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("transformers_version", "dtype", "torch_dtype", "architectures", "auto_map", "rope_parameters")
    }
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" in rope:
        fields["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if rope.get("rope_type", "default") != "default":  # transformers 4.37 names the kind "type"
        fields["rope_scaling"] = {"type": rope["rope_type"], **{k: v for k, v in rope.items() if k != "rope_type"}}
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype is not None:
        fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    if config.model_type == "stablelm":  # Med-MoE's StableLMEpochConfig reads these names
        fields["rope_pct"] = fields.get("partial_rotary_factor", 0.25)
        fields["norm_eps"] = fields.get("layer_norm_eps", 1e-5)
    fields["vocab_size"] = int(vocab_rows)
    return fields


def export_moe_llava(
    built: Any, model_cfg: Any, out: str | Path, *, vision_path: str | Path | None = None
) -> MoELLaVAExport:
    """Write ``built`` (a ``BuiltModel``, hand-over restored) to ``out`` in MoE-LLaVA's layout (module docstring);
    :class:`pipeline.export.ExportError` with every reason when it cannot be expressed."""
    from pipeline.export import ExportError, image_processor_for, save_weights

    model = built.model
    reasons, notes = moe_llava_refusals(model_cfg, model)
    if reasons:
        raise ExportError("cannot export in MoE-LLaVA's layout: " + "; ".join(reasons))
    if built.tokenizer is None:
        raise ExportError("the model has no tokenizer files (a built-in architecture): nothing to export with")
    entries = _moe_entries(model)
    moe = moe_config(entries, model)
    meta = bool(entries) and entries[0]["meta_expert"]
    llm, vision = model.llm, model.vision
    kind = LLM_KINDS[llm.config.model_type]
    prefix = "MoELLaVA" if moe else "Llava"
    fields = {
        **llm_fields(llm.config, llm.get_input_embeddings().weight.shape[0]),
        "model_type": f"moe_llava_{kind}" if moe else f"llava_{kind}",
        "architectures": [f"{prefix}{kind.capitalize()}ForCausalLM"],
        **({"moe": moe} if moe else {}),
        "mm_image_tower": str(vision_path if vision_path is not None else model_cfg.vision.path),
        "mm_video_tower": None,
        "image_projector_type": PROJECTORS[model_cfg.connector.type],
        "video_projector_type": "linear",
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": vision.select_layer,
        "mm_vision_select_feature": vision.select_feature,
        "image_aspect_ratio": "pad" if model_cfg.vision.pad_square else "square",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
    }
    state = moe_llava_state_dict(model, zero_router_bias=meta)
    out = Path(out)
    out.mkdir(parents=True)
    save_weights(state, out)
    (out / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    built.tokenizer.save_pretrained(out)
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.save_pretrained(out)
    image_processor_for(vision, vision_path).save_pretrained(out)
    return MoELLaVAExport(out=out, moe=moe, notes=notes)


__all__ = ["LLM_KINDS", "MoELLaVAExport", "export_moe_llava", "llm_fields", "moe_config", "moe_llava_refusals"]
