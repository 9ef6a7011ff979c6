"""What the runner does differently for Med-MoE / MedPLIB stages: router stages and ``moe`` blocks.

- ``kind: router``: the modality classifier is attached to the model and trained alone
  (``RouterModule``); its accuracy and a confusion matrix (png + json) go to MLflow.
- ``moe:``: before the stage trains, the selected decoder FFNs become MoE layers (``add_moe``): E
  copies of the dense FFN, or with ``moe.sources`` the FFNs of earlier stages' LLMs (MedPLIB stage
  IV); routers initialised from a router stage's classifier (``router_init: modality_classifier``)
  and frozen unless ``router_trainable``. The change is recorded in the model's structure, so the
  hand-over rebuilds it (``pipeline/structure.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.structure import add_modality_classifier, add_moe

log = logging.getLogger("medpipe")

DEFAULT_NUM_EXPERTS = 4


def router_stage_of(cfg: DictConfig, name: str) -> str:
    """The router stage whose classifier initialises stage ``name``'s MoE routers."""
    moe = cfg.stages[name].moe
    if moe.router_stage:
        return moe.router_stage
    names = list(cfg.stages.keys())
    routers = [n for n in names[: names.index(name)] if cfg.stages[n].kind == "router"]
    if not routers:
        raise ValueError(f"stages.{name}.moe.router_init: modality_classifier needs an earlier kind: router stage")
    return routers[-1]


def classifier_from_handover(path: Path) -> nn.Linear:
    """The ``modality_classifier.linear`` of a router stage's hand-over as a Linear(D, C)."""
    from pipeline.handover import load_handover

    state = load_handover(path)["state_dict"]
    weight, bias = state.get("modality_classifier.linear.weight"), state.get("modality_classifier.linear.bias")
    if weight is None:
        raise ValueError(f"{path}: no modality classifier in this hand-over (is it a kind: router stage's?)")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def source_llms(cfg: DictConfig, sources: list[str], handovers: dict[str, Path]) -> list[nn.Module]:
    """The LLM of each source stage, rebuilt from the config and its hand-over (LoRA already merged)."""
    from pipeline.handover import restore
    from pipeline.model_factory import build_model

    llms = []
    for source in sources:
        if source not in handovers:
            raise ValueError(f"moe.sources: stage {source!r} has no hand-over yet (it must run earlier)")
        built = build_model(cfg.model, cache_dir=cfg.cache_dir)
        restore(built.model, handovers[source])
        llms.append(built.model.llm)
    return llms


def prepare_stage(cfg: DictConfig, name: str, model: nn.Module, handovers: dict[str, Path]) -> None:
    """Structural changes of stage ``name`` on the (restored) model; ``handovers``: earlier stage -> file."""
    stage = cfg.stages[name]
    if stage.kind == "router":
        add_modality_classifier(model, list(stage.router.modalities))
    moe = stage.moe
    if moe is None:
        return
    sources = list(moe.sources or [])
    router_init = None
    if moe.router_init == "modality_classifier":
        router_name = router_stage_of(cfg, name)
        if router_name not in handovers:
            raise ValueError(f"stages.{name}.moe.router_stage: stage {router_name!r} has no hand-over yet")
        router_init = classifier_from_handover(handovers[router_name])
    layers = moe.layers if isinstance(moe.layers, str) else list(moe.layers)
    entry = add_moe(
        model,
        layers=layers,
        num_experts=moe.num_experts or len(sources) or DEFAULT_NUM_EXPERTS,
        top_k=moe.top_k,
        meta_expert=moe.meta_expert,
        renormalize=moe.renormalize,
        capacity_factor=moe.capacity_factor,
        aux_loss_coef=moe.aux_loss_coef,
        z_loss_coef=moe.z_loss_coef,
        jitter=moe.jitter,
        router_init=router_init,
        sources=source_llms(cfg, sources, handovers) if sources else None,
    )
    log.info(
        "stage %s: MoE in decoder layers %s, %d experts%s, top-%d, routers %s",
        name,
        entry["layers"],
        entry["num_experts"],
        f" from stages {sources}" if sources else " (upcycled)",
        entry["top_k"],
        "from the modality classifier" if router_init is not None else "random",
    )


def adjust_trainable(cfg: DictConfig, name: str, model: nn.Module, trainable: dict[str, int]) -> dict[str, int]:
    """MoE routers: frozen unless ``moe.router_trainable`` (then they train even if no group lists them)."""
    from pipeline.trainable import set_moe_routers_trainable

    moe = cfg.stages[name].moe
    if moe is None:
        return trainable
    if moe.router_trainable:
        return {**trainable, "moe_router": set_moe_routers_trainable(model, True)}
    frozen = set_moe_routers_trainable(model, False)
    log.info("stage %s: %d router parameters frozen (moe.router_trainable: false)", name, frozen)
    return {group: (count - frozen if group == "llm" else count) for group, count in trainable.items()}


def stage_module(cfg: DictConfig, name: str, model: nn.Module) -> Any | None:
    """The LightningModule of a router stage (None for other kinds)."""
    stage = cfg.stages[name]
    if stage.kind != "router":
        return None
    from lightningmodules.router_module import RouterModule

    optim = stage.optim
    return RouterModule(
        model=model,
        modalities=list(stage.router.modalities),
        dataset_modality=OmegaConf.to_container(stage.router.dataset_modality),
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=tuple(optim.betas),
        warmup_ratio=optim.warmup_ratio,
        scheduler=optim.scheduler,
        min_lr_ratio=optim.min_lr_ratio,
    )


def log_stage_artifacts(tracker: Any, run_id: str | None, module: Any, name: str, out_dir: Path) -> dict[str, Any]:
    """Router stage: confusion matrix (json + png) and accuracy; MoE stage: expert load per layer and modality.

    Files are written to ``out_dir`` too; returns what was logged."""
    logged: dict[str, Any] = {}
    confusion = getattr(module, "confusion", None)
    if confusion:
        from lightningmodules.router_module import confusion_report
        from pipeline.plots import confusion_matrix_figure

        split = "val" if "val" in confusion else "train"
        report = confusion_report(confusion[split], module.modalities, split=split)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "confusion_matrix.json").write_text(json.dumps(report, indent=2))
        tracker.log_text(run_id, json.dumps(report, indent=2), "router/confusion_matrix.json")
        tracker.log_metrics(run_id, {f"router/{split}_accuracy_final": report["accuracy"]})
        figure = confusion_matrix_figure(
            report["matrix"],
            report["modalities"],
            title=f"stage {name}: modality router ({split}, acc {report['accuracy']:.3f})",
        )
        figure.savefig(out_dir / "confusion_matrix.png")
        tracker.log_figure(run_id, figure, "router/confusion_matrix.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
        logged["confusion_matrix"] = report
        log.info(
            "stage %s: modality router %s accuracy %.3f over %d samples",
            name,
            split,
            report["accuracy"],
            report["count"],
        )
    monitor = getattr(module, "moe", None)
    if monitor is not None and monitor.enabled and not confusion:
        summary = monitor.summary()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "expert_load.json").write_text(json.dumps(summary, indent=2))
        tracker.log_text(run_id, json.dumps(summary, indent=2), "moe/expert_load.json")
        tracker.log_metrics(run_id, {"moe/dropped_total": float(summary["dropped_total"])})
        logged["expert_load"] = summary
    return logged
