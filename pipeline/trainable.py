"""Per-stage model changes: LoRA adapters in and out, and which parameter groups train."""

from __future__ import annotations

from omegaconf import DictConfig

from lightningmodules.models.multimodal import MultimodalLM


def add_lora(model: MultimodalLM, cfg: DictConfig) -> None:
    """Wrap the LLM with peft LoRA adapters (every Linear but lm_head for ``all-linear``)."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets,
                        task_type="CAUSAL_LM")
    model.llm = get_peft_model(model.llm, config)


def merge_lora(model: MultimodalLM) -> None:
    """Fold the adapters into the base weights so the next stage sees a plain model."""
    from peft import PeftModel

    if isinstance(model.llm, PeftModel):
        model.llm = model.llm.merge_and_unload()


def parameter_groups(model: MultimodalLM) -> dict[str, list[str]]:
    """Group name -> parameter names, for the stage config's ``train`` list."""
    groups: dict[str, list[str]] = {"connector": [], "lora": [], "llm": [], "vision": []}
    for name, _ in model.named_parameters():
        if name.startswith("connector."):
            groups["connector"].append(name)
        elif name.startswith("vision."):
            groups["vision"].append(name)
        elif "lora_" in name:
            groups["lora"].append(name)
        elif name.startswith("llm."):
            groups["llm"].append(name)
    return groups


def set_trainable(model: MultimodalLM, groups: list[str]) -> dict[str, int]:
    """Train exactly the listed groups; returns trainable parameter counts per group."""
    names = parameter_groups(model)
    unknown = set(groups) - set(names)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(names)}")
    wanted = {n for g in groups for n in names[g]}
    counts = {g: 0 for g in groups}
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)
    params = dict(model.named_parameters())
    for g in groups:
        counts[g] = sum(params[n].numel() for n in names[g])
    model.vision.frozen = "vision" not in groups
    return counts
