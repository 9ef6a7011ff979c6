"""Per-stage model changes: LoRA adapters in and out, and which parameter groups train."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from lightningmodules.models.multimodal import MultimodalLM


def add_lora(model: MultimodalLM, cfg: DictConfig) -> None:
    """Wrap the LLM with peft LoRA adapters (every Linear but lm_head for ``all-linear``)."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(model.llm, config)


def merge_lora(model: MultimodalLM) -> None:
    """Fold the adapters into the base weights so the next stage sees a plain model."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()


def parameter_groups(model: MultimodalLM) -> dict[str, list[str]]:
    """Group name -> parameter names, for the stage config's ``train`` list."""
    groups: dict[str, list[str]] = {"connector": [], "lora": [], "llm": [], "vision": []}
    groups.update(moe_parameter_groups(model))
    groups.update(grounding_parameter_groups(model))
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
