"""Per-stage model changes: LoRA adapters in and out, and which parameter groups train."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from lightningmodules.models.multimodal import MultimodalLM

ALL_LINEAR = "all-linear"  # every Linear of the LLM except lm_head (peft's convention); stands alone
# Family-neutral ``lora.target_modules`` aliases: the Linear layers inside one block of every decoder layer, found
# by structure (the layer's first attribute of these names), whatever the family calls them. ``mlp``: Llama /
# Mistral / Qwen / Gemma / StableLM gate_proj, up_proj, down_proj, Phi fc1, fc2, GPT-2 c_fc, c_proj, GPT-NeoX
# dense_h_to_4h, dense_4h_to_h; ``attention``: q_proj, k_proj, v_proj, o_proj (Phi: dense), GPT-2 c_attn, c_proj,
# GPT-NeoX query_key_value, dense.
LORA_ALIASES: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp", "feed_forward"),
    "attention": ("self_attn", "attn", "attention", "self_attention"),
}
DECODER_LAYER_LISTS = ("layers", "h", "blocks")  # the ModuleList of decoder layers under get_decoder()
# ``experts``: LoRA on every MoE layer's experts (each expert's gate / up / down, or fc1 / fc2), which are stacked
# weights peft cannot adapt: ``GroupedExperts.add_lora`` (MedPLIB stage IV)
EXPERTS_TARGET = "experts"


class LoraTargetError(ValueError):
    """``lora.target_modules`` do not resolve in the LLM; the message says what it has."""


def lora_layer_types() -> tuple[type[nn.Module], ...]:
    """The layer types a target name selects (peft adapts them): ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def linear_names(llm: nn.Module) -> list[str]:
    """The distinct last names of the LLM's Linear layers (what LoRA ``target_modules`` match), in model order."""
    names: dict[str, None] = {}
    for name, module in llm.named_modules():
        if isinstance(module, lora_layer_types()):
            names.setdefault(name.rpartition(".")[2], None)
    return list(names)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM: ``get_decoder()``'s ``layers`` (``h`` for GPT-2, ``blocks``)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    for attr in DECODER_LAYER_LISTS:
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    raise LoraTargetError(
        f"{type(llm).__name__}: no decoder layers found (get_decoder() has none of {', '.join(DECODER_LAYER_LISTS)}); "
        "name the Linear layers to adapt instead of an alias"
    )


def block_linear_names(llm: nn.Module, alias: str) -> list[str]:
    """Full names (as in ``llm.named_modules()``) of the Linear layers inside the ``alias`` block (a key of
    ``LORA_ALIASES``) of every decoder layer. Raises :class:`LoraTargetError` when a layer has no such block, or
    the block holds parameters outside Linear and norm layers (e.g. a mixture of experts' stacked weights)."""
    names = {id(module): name for name, module in llm.named_modules()}
    found: list[str] = []
    for index, layer in enumerate(decoder_layers(llm)):
        attr = next((a for a in LORA_ALIASES[alias] if isinstance(getattr(layer, a, None), nn.Module)), None)
        if attr is None:
            children = ", ".join(name for name, _ in layer.named_children())
            raise LoraTargetError(
                f"{alias}: decoder layer {index} ({type(layer).__name__}) has none of "
                f"{', '.join(LORA_ALIASES[alias])} (its children: {children}); name the Linear layers to adapt"
            )
        block = getattr(layer, attr)
        linears, others = [], []
        for sub, module in block.named_modules():
            if isinstance(module, lora_layer_types()):
                linears.append(f"{names[id(block)]}.{sub}" if sub else names[id(block)])
            elif any(True for _ in module.parameters(recurse=False)) and "norm" not in type(module).__name__.lower():
                others.append(f"{sub or attr} ({type(module).__name__})")
        if others or not linears:
            reason = f"parameters outside Linear layers: {', '.join(others)}" if others else "no Linear layers"
            raise LoraTargetError(
                f"{alias}: decoder layer {index}'s {attr} ({type(block).__name__}) is not a block of Linear layers "
                f"({reason}); name the Linear layers to adapt"
            )
        found += linears
    return found


def lora_targets(llm: nn.Module, target_modules: Sequence[str]) -> str | list[str]:
    """``lora.target_modules`` resolved in ``llm``, as peft's ``LoraConfig.target_modules``: ``"all-linear"``
    alone stays; an alias of ``LORA_ALIASES`` becomes the full names of its Linear layers
    (:func:`block_linear_names`); any other target is kept and must match a Linear layer whose dotted name is it
    or ends with ``.<target>``, as peft matches them. The one resolution LoRA (:func:`add_lora`) and the
    pre-flight check use; raises :class:`LoraTargetError`."""
    targets = [t for t in target_modules if t != EXPERTS_TARGET]
    if EXPERTS_TARGET in target_modules and not _moe_layers(llm):
        raise LoraTargetError(f"{EXPERTS_TARGET}: the LLM has no MoE layers (a stage's moe block makes them)")
    if not targets:
        return []
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    if ALL_LINEAR in targets:
        raise LoraTargetError(f"{ALL_LINEAR} stands alone (got {', '.join(targets)})")
    modules = [name for name, module in llm.named_modules() if isinstance(module, lora_layer_types())]
    resolved: list[str] = []
    absent: list[str] = []
    for target in targets:
        if target in LORA_ALIASES:
            resolved += [name for name in block_linear_names(llm, target) if name not in resolved]
        elif any(m == target or m.endswith(f".{target}") for m in modules):
            resolved += [] if target in resolved else [target]
        else:
            absent.append(target)
    if absent:
        raise LoraTargetError(f"{', '.join(absent)} not in the LLM (its Linear layers: {', '.join(linear_names(llm))})")
    return resolved


def _moe_layers(llm: nn.Module) -> list:
    from lightningmodules.models.moe import moe_layers

    return moe_layers(llm)


def add_lora(model: MultimodalLM, cfg: DictConfig) -> None:
    """LoRA adapters on :func:`lora_targets` (every Linear but lm_head for ``all-linear``): peft wraps the LLM;
    the ``experts`` target puts adapters on every MoE layer's experts (``GroupedExperts.add_lora``)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model.llm, cfg.target_modules)
    if EXPERTS_TARGET in cfg.target_modules:
        for _, layer in _moe_layers(model.llm):
            layer.experts.add_lora(rank=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    if not targets:
        return
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model.llm = get_peft_model(model.llm, config)


def merge_lora(model: MultimodalLM) -> None:
    """Fold every adapter (peft's and the experts') into the base weights so the next stage sees a plain model."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()
    for _, layer in _moe_layers(model.llm):
        layer.experts.merge_lora()


def parameter_groups(model: MultimodalLM) -> dict[str, list[str]]:
    """Group name -> parameter names, for the stage config's ``train`` list."""
    groups: dict[str, list[str]] = {"connector": [], "lora": [], "llm": [], "vision": []}
    groups.update(moe_parameter_groups(model))
    groups.update(grounding_parameter_groups(model))
    groups["norms"] = norm_parameter_names(model)
    for name, _ in model.named_parameters():
        if name.startswith("modality_classifier."):
            continue  # its own group (moe_parameter_groups), never part of "llm"
        if name.startswith("connector."):
            groups["connector"].append(name)
        elif name.startswith("vision."):
            groups["vision"].append(name)
        elif "lora_" in name:
            groups["lora"].append(name)
        elif name.startswith("llm."):
            groups["llm"].append(name)
    return groups


def moe_parameter_groups(model: MultimodalLM) -> dict[str, list[str]]:
    """``ffn`` (every decoder FFN: dense ones, and the experts + meta expert of MoE layers), ``experts``
    (MoE experts and meta experts), ``moe_router`` and ``modality_classifier`` parameter names.

    FFNs are found as ``llm.get_decoder().layers[i].mlp`` (any family); LoRA adapter weights stay in ``lora``.
    """
    from lightningmodules.models.moe import MoEFeedForward

    groups: dict[str, list[str]] = {"ffn": [], "experts": [], "moe_router": [], "modality_classifier": []}
    ffn_modules: list[str] = []
    for name, _module in model.named_modules():
        parent, _, child = name.rpartition(".")
        if child == "mlp" and parent.rpartition(".")[0].endswith("layers") and name.startswith("llm."):
            ffn_modules.append(name + ".")
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            groups["moe_router"] += [f"{name}.router.{n}" for n, _ in module.router.named_parameters()]
            groups["experts"] += [f"{name}.experts.{n}" for n, _ in module.experts.named_parameters()]
            if module.meta_expert is not None:
                groups["experts"] += [f"{name}.meta_expert.{n}" for n, _ in module.meta_expert.named_parameters()]
    routers = set(groups["moe_router"])
    for name, _ in model.named_parameters():
        if name.startswith("modality_classifier."):
            groups["modality_classifier"].append(name)
        elif "lora_" not in name and name not in routers and any(name.startswith(m) for m in ffn_modules):
            groups["ffn"].append(name)
    groups["experts"] = [n for n in groups["experts"] if "lora_" not in n]
    return groups


def norm_parameter_names(model: MultimodalLM) -> list[str]:
    """The ``norms`` group: the parameters of the normalisation layers inside the LLM's decoder layers (modules
    whose class name has "norm": Llama's input / post-attention RMSNorms, as MedPLIB stage II trains them
    by name); the final norm after the last layer is not in it (MedPLIB leaves it frozen)."""
    inside = {
        id(m) for layer in decoder_layers(model.llm) for m in layer.modules() if "norm" in type(m).__name__.lower()
    }
    names = []
    for name, module in model.named_modules():
        if id(module) in inside:
            names += [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
    return names


def set_moe_routers_trainable(model: MultimodalLM, trainable: bool) -> int:
    """Train or freeze every MoE token router (Med-MoE keeps the classifier-initialised routers fixed);
    returns the number of router parameters."""
    names = set(moe_parameter_groups(model)["moe_router"])
    count = 0
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(trainable)
            count += param.numel()
    float32_masters(model)
    return count


def grounding_parameter_groups(model: MultimodalLM) -> dict[str, list[str]]:
    """MedPLIB (``GroundedMultimodalLM``): ``grounding`` = SEG projection + the mask decoder parts that shape
    the single mask (SAM's encoders always stay frozen), ``region`` = the region adapter (empty for other
    models); ``embeddings`` = the LLM's input embeddings + LM head (any model; LISA / MedPLIB train them so
    the rows of added tokens such as ``<SEG>`` learn)."""
    grounding = model.grounding_parameter_names() if hasattr(model, "grounding_parameter_names") else []
    region = [n for n, _ in model.named_parameters() if n.startswith("region.")]
    llm = model.llm
    table = {
        id(p)
        for part in (llm.get_input_embeddings(), llm.get_output_embeddings())
        if part is not None
        for p in part.parameters()
    }
    embeddings = [n for n, p in model.named_parameters() if id(p) in table]
    return {"grounding": grounding, "region": region, "embeddings": embeddings}


def set_trainable(
    model: MultimodalLM, groups: list[str], *, frozen: list[str] | tuple[str, ...] = ()
) -> dict[str, int]:
    """Train exactly the listed groups, less the parameters of the ``frozen`` groups (MoE routers inside
    ``llm``); returns trainable parameter counts per group."""
    names = parameter_groups(model)
    unknown = (set(groups) | set(frozen)) - set(names)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(names)}")
    wanted = {n for g in groups for n in names[g]} - {n for g in frozen for n in names[g]}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    float32_masters(model)
    params = dict(model.named_parameters())
    counts = {g: sum(params[n].numel() for n in names[g] if n in wanted) for g in groups}
    model.vision.frozen = "vision" not in groups
    return counts


def float32_masters(model: MultimodalLM) -> int:
    """Cast every trainable half-precision parameter to float32, in place; frozen ones keep their load dtype.

    AdamW's steps (~lr) are below half a bf16 ulp of most weights at lr 2e-5, so a bf16 parameter would lose
    them; the float32 copy keeps them, and autocast (``trainer.precision: bf16-mixed``) runs the matmuls in
    16 bits beside the frozen half weights. Returns the number of parameters cast."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
