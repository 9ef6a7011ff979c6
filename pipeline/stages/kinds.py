"""The one place that reads a stage's ``kind`` (imports no torch: config validation uses it too).

``vlm`` (the default) trains the multimodal model (plain, with an ``moe`` block, or grounded);
``router`` trains Med-MoE's modality classifier on the frozen model.
"""

from __future__ import annotations

from typing import Any

VLM = "vlm"
ROUTER = "router"
STAGE_KINDS = (VLM, ROUTER)


def is_router_stage(stage: Any) -> bool:
    """Whether a stage config trains the modality classifier (``kind: router``)."""
    return stage.kind == ROUTER


def router_stages(cfg: Any, *, before: str | None = None) -> list[str]:
    """Names of the router stages, in YAML order; ``before``: only those that run before that stage."""
    names = list(cfg.stages.keys())
    if before is not None:
        names = names[: names.index(before)]
    return [n for n in names if is_router_stage(cfg.stages[n])]


def router_stage_of(cfg: Any, name: str) -> str:
    """The router stage whose classifier initialises stage ``name``'s MoE routers (``moe.router_stage``, else
    the last router stage before it)."""
    moe = cfg.stages[name].moe
    if moe.router_stage:
        return moe.router_stage
    routers = router_stages(cfg, before=name)
    if not routers:
        raise ValueError(f"stages.{name}.moe.router_init: modality_classifier needs an earlier kind: router stage")
    return routers[-1]
