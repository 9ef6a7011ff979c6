"""MedPLIB's released checkpoint (stage IV, e.g. the Hugging Face folder Huangxs/MedPLIB-7b-2e) into medpipe's
grounded MoE model.

Sources read (``MedPLIB`` = github.com/ShawnHuang497/MedPLIB; line numbers at 9c3efe9 "release model and dataset",
the commit the released checkpoint came with; 5ab54bc changes these modules only by the optional MedPLIB-ICL parts,
refused below):

- ``merge_lora_weights_and_save_hf_model_moe.py:231-345`` writes the folder: ``MedPLIBForCausalLM`` with its MoE
  layers (``initialize_moe_modules``), the stage-IV weights loaded, LoRA merged (``merge_and_unload``), then
  ``save_pretrained(state_dict=model.state_dict())`` (every parameter, the CLIP tower included) and the tokenizer
  with MedPLIB's added tokens (``<SEG>``, ``<region>``, ``</region>``, ... lines 197-206).
- ``model/MedPLIB.py:141-164`` (``MedPLIBMetaModel``): ``model.visual_model`` = SAM-Med2D ViT-B
  (``model/segment_anything_med2d/build_sam.py:51-121``: 256 px, ``encoder_adapter=True``, so every image-encoder
  block has an ``Adapter`` (``modeling/image_encoder.py:18-56, 214``); ``pixel_mean`` / ``pixel_std`` are
  non-persistent buffers, ``modeling/sam.py:46-47``), ``model.text_hidden_fcs.0`` = ``Sequential(Linear(d, d), ReLU,
  Linear(d, out_dim), Dropout)`` (the SEG projection; keys ``.0.0`` / ``.0.2``).
- ``model/medplib/model/medplib_arch.py:67-89`` (``LlavaMetaModel``): ``model.vision_tower.vision_tower.*`` (CLIP,
  ``multimodal_encoder/clip_encoder.py:26``), ``model.mm_projector.{0,2}`` (``mlp2x_gelu``,
  ``multimodal_projector/builder.py``), ``model.region_fea_adapter`` = ``Linear(mm_hidden_size, hidden_size)``,
  always created.
- ``model/medplib/model/language_model/medplib_moe_llama.py:480-642``: the Llama decoder layers of
  ``moe_layers_idx`` (``dense`` in stage IV: all) become DeepSpeed 0.13.1 ``MoE`` layers (``requirements.txt``
  pins ``deepspeed==0.13.1``): ``mlp.deepspeed_moe.gate.wg`` = ``Linear(d, E, bias=False)`` (DeepSpeed's own gate,
  ``sharded_moe.py``), ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{gate_proj,up_proj,down_proj}`` (expert 0
  from stage III, expert 1 from stage II), no meta expert, no residual (lines 110-160: ``out = residual + moe(x)``).
  ``config.moe`` holds ``moe_layers_idx`` (resolved), ``num_experts`` (one count per layer), ``top_k_experts``,
  ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``, ``use_residual``, ``router_aux_loss_coef``,
  ``ep_size``; ``model/MedPLIB.py:243-259`` rebuilds the MoE from it at evaluation.

How it maps: ``config.moe`` -> one medpipe ``moe`` entry (layers, experts, top-k, no meta expert, router without
bias, DeepSpeed's capacity from the config: random drops by ``use_rts`` for top-1, padding counted), applied before
the weights; then

    model.layers.* / model.embed_tokens / model.norm / lm_head    -> llm.*   (MoE layers: moe_llava.deepspeed_moe_rules)
    model.vision_tower.vision_tower.[vision_model.]*               -> vision.encoder.*
    model.mm_projector.{0,2}                                        -> connector.fc{1,2}
    model.region_fea_adapter                                        -> region.adapter   (left out when region is off)
    model.text_hidden_fcs.0.{0,2}                                   -> grounding.seg_projection.{0,2}
    model.visual_model.<SAM key>                                    -> grounding.sam.<transformers SamModel key>
                                                                       (lightningmodules/models/sam_convert.py's table)

Left out, with the reason in the import report: the SAM-Med2D image-encoder adapters (transformers' ``SamModel``
has no place for them; importing needs ``model.grounding.sam_allow_missing_adapters: true``, and the image encoder
then computes plain SAM ViT-B features, a documented deviation, docs/sam_med2d.md), rotary buffers.

UNVERIFIED (no released file was downloaded; everything above is read from the code that writes it): the
``model_type`` string in the released ``config.json`` (``MedPLIBMoELlamaConfig.model_type`` is
``medplib_moe_llama``, which ``to_dict`` writes; a LISA-style config with ``out_dim`` and ``mm_vision_tower`` is
accepted too); the capacity values saved in it (the merge script's defaults are 1 / 2 / 0, its flags may differ).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.importers.checkpoints import read_config
from pipeline.importers.keymap import CheckpointLayoutError, ImportReport, Rule
from pipeline.importers.moe_llava import (
    MOE_KEY,
    ROTARY,
    TargetViews,
    check_moe,
    deepspeed_moe_entry,
    deepspeed_moe_rules,
    expert_views,
)

PROJECTORS = {"mlp2x_gelu": "mlp", "linear": "linear"}
TOWER_PREFIX = "model.vision_tower.vision_tower."
SAM_ORIGINAL = "grounding.sam@original."  # SamModel keys seen under their original segment-anything names
ADAPTERS = r"model\.visual_model\.image_encoder\.blocks\.\d+\.Adapter\..+"
ADAPTER_REASON = (
    "SAM-Med2D image-encoder adapters: transformers' SamModel has none (model.grounding.sam_allow_missing_adapters)"
)
# MedPLIB-ICL (5ab54bc) options that add modules the released stage-IV model does not have
ICL_OPTIONS = ("icl_mask_encoder", "mm_token_compress")


def is_medplib(config: Mapping[str, Any]) -> bool:
    if config.get("model_type") == "medplib_moe_llama":
        return True
    return "out_dim" in config and "mm_vision_tower" in config and "train_mask_decoder" in config


def rules_for(model_cfg: Any) -> list[Rule]:
    region_on = model_cfg.grounding is not None and model_cfg.grounding.region
    region = (
        Rule(r"model\.region_fea_adapter\.(weight|bias)", r"region.adapter.\1")
        if region_on
        else Rule(r"model\.region_fea_adapter\.(weight|bias)", None, "region adapter: model.grounding.region is off")
    )
    return [
        *deepspeed_moe_rules(r"model\.layers", "llm.model.layers"),
        Rule(r"model\.mm_projector\.0\.(weight|bias)", r"connector.fc1.\1"),
        Rule(r"model\.mm_projector\.2\.(weight|bias)", r"connector.fc2.\1"),
        Rule(r"model\.mm_projector\.(weight|bias)", r"connector.proj.\1"),
        # transformers < 5 named the tower's parameters vision_model.*, 5.x without that level: both accepted
        Rule(r"model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)", r"vision.encoder.\1"),
        region,
        Rule(r"model\.text_hidden_fcs\.0\.0\.(weight|bias)", r"grounding.seg_projection.0.\1"),
        Rule(r"model\.text_hidden_fcs\.0\.2\.(weight|bias)", r"grounding.seg_projection.2.\1"),
        Rule(ADAPTERS, None, ADAPTER_REASON),
        Rule(r"model\.visual_model\.(?:pixel_mean|pixel_std)", None, "SAM's preprocessing constants (not weights)"),
        Rule(
            r"model\.visual_model\.(?!image_encoder\.blocks\.\d+\.Adapter\.|pixel_mean$|pixel_std$)(.+)",
            SAM_ORIGINAL + r"\1",
        ),  # fmt: skip
        ROTARY,
        Rule(
            r"model\.(?!mm_projector\.|vision_tower\.|visual_model\.|text_hidden_fcs\.|region_fea_adapter\.)"
            rf"(?!layers\.\d+\.{MOE_KEY})(.+)(?<!\.inv_freq)",
            r"llm.model.\1",
        ),
        Rule(r"lm_head\.weight", r"llm.lm_head.weight"),
    ]


def sam_views(model: nn.Module) -> TargetViews:
    """The grounding head's transformers ``SamModel`` keys under their original segment-anything names (what
    SAM-Med2D's ``visual_model`` holds), renamed back by ``sam_convert``'s table when assembled. The tied copy
    of the positional embedding is filled from its source."""
    from lightningmodules.models.sam_convert import TIED_HF_KEY, to_original_key

    views = TargetViews()
    grounding = getattr(model, "grounding", None)
    if grounding is None:
        return views
    sam = grounding.sam
    names: dict[str, str] = {}
    for key, value in sam.state_dict().items():
        views.replaced.add(f"grounding.sam.{key}")
        if key == TIED_HF_KEY:
            continue
        virtual = SAM_ORIGINAL + to_original_key(key, sam.config)
        views.virtual[virtual] = torch.empty(value.shape, dtype=value.dtype, device="meta")
        names[virtual] = f"grounding.sam.{key}"

    def build(mapped: dict[str, torch.Tensor], _report: ImportReport) -> None:
        for virtual, name in names.items():
            mapped[name] = mapped[virtual]
        tied_source = "grounding.sam.prompt_encoder.shared_embedding.positional_embedding"
        if tied_source in mapped:
            mapped[f"grounding.sam.{TIED_HF_KEY}"] = mapped[tied_source]

    views.builders.append(build)
    return views


class MedPLIBLayout:
    """``model.init: {format: medplib, path: <folder>}`` (module docstring)."""

    name = "medplib"

    def read_config(self, path: Path) -> dict[str, Any]:
        return read_config(path)

    def llm_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        if not is_medplib(config):
            return None
        fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in ("moe", "architectures")}
        return {**fields, "model_type": "llama"}

    def vision_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def parts(self, keys: list[str]) -> set[str]:
        parts = {"llm", "connector", "grounding", "region"}
        return parts | ({"vision"} if any(k.startswith(TOWER_PREFIX) for k in keys) else set())

    def check_settings(self, config: dict[str, Any], model_cfg: Any, path: Path, keys: list[str]) -> None:
        file = path / "config.json"
        if not is_medplib(config):
            raise CheckpointLayoutError(
                f"{file}: model_type {config.get('model_type')!r} is not MedPLIB's (medplib_moe_llama)"
            )
        used = [option for option in ICL_OPTIONS if config.get(option)]
        if used:
            raise CheckpointLayoutError(f"{file}: {', '.join(used)} set (MedPLIB-ICL modules); medpipe has none")
        grounding = model_cfg.grounding
        if grounding is None:
            raise CheckpointLayoutError(
                "model.grounding: null, but MedPLIB's checkpoint has the SAM grounding head and the region adapter "
                "(set model.grounding, e.g. as experiments/medplib/medplib.yaml does)"
            )
        adapters = [k for k in keys if ".Adapter." in k and k.startswith("model.visual_model.image_encoder.")]
        if adapters and not grounding.sam_allow_missing_adapters:
            raise CheckpointLayoutError(
                f"model.grounding.sam_allow_missing_adapters: false, but {path} has {len(adapters)} SAM-Med2D "
                "image-encoder adapter tensors (encoder_adapter=True) that transformers' SamModel cannot hold; "
                "set it true to import without them (the image encoder then computes plain SAM ViT-B features)"
            )
        moe = config.get("moe")
        if isinstance(moe, dict) and moe.get("moe_layers_idx"):
            check_moe(moe, path)
        projector = config.get("mm_projector_type", "linear")
        if projector not in PROJECTORS:
            raise CheckpointLayoutError(
                f"{file}: mm_projector_type {projector!r}; medpipe maps {', '.join(PROJECTORS)}"
            )
        # MedPLIBModel forces mm_vision_select_feature "patch" (model/MedPLIB.py:177); the dataset pads every CLIP
        # input to a square with the mean colour (datasets/LazySupervisedDataset.py), whatever image_aspect_ratio says
        expected = {
            "model.connector.type": (PROJECTORS[projector], f"mm_projector_type = {projector!r}"),
            "model.vision.select_layer": (
                config.get("mm_vision_select_layer", -2),
                f"mm_vision_select_layer = {config.get('mm_vision_select_layer', -2)!r}",
            ),
            "model.vision.select_feature": ("patch", "patch features (model/MedPLIB.py:177)"),
            "model.vision.pad_square": (True, "square-padded CLIP inputs (datasets/LazySupervisedDataset.py)"),
            "model.connector.aggregation": ("none", "every patch token fed to the LLM"),
        }
        actual = {
            "model.connector.type": model_cfg.connector.type,
            "model.vision.select_layer": model_cfg.vision.select_layer,
            "model.vision.select_feature": model_cfg.vision.select_feature,
            "model.vision.pad_square": model_cfg.vision.pad_square,
            "model.connector.aggregation": model_cfg.connector.aggregation,
        }
        for key, (value, why) in expected.items():
            if actual[key] != value:
                raise CheckpointLayoutError(f"{key}: {actual[key]!r}, but {path} has {why} (set {key}: {value!r})")

    def structure(self, config: dict[str, Any], keys: list[str], path: Path) -> list[dict[str, Any]]:
        moe = config.get("moe")
        if not isinstance(moe, dict) or not moe.get("moe_layers_idx"):
            return []
        return [deepspeed_moe_entry(moe, keys, path, dropless=False)]

    def rules(self, config: dict[str, Any], model_cfg: Any) -> list[Rule]:
        return rules_for(model_cfg)

    def views(self, model: nn.Module, source: Mapping[str, torch.Tensor], config: dict[str, Any]) -> TargetViews:
        return expert_views(model).merge(sam_views(model))


LAYOUT = MedPLIBLayout()
