"""The Stage objects decide, before anything trains, what each stage kind prepares, trains and runs with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
MED_MOE_TINY = REPO / "experiments" / "med_moe" / "tiny.yaml"
MEDPLIB_TINY = REPO / "experiments" / "medplib" / "tiny.yaml"
DEMO = REPO / "experiments" / "demo.yaml"


def test_stage_classes_follow_kind_and_model() -> None:
    from pipeline.stages import GroundingStage, RouterStage, VLMStage, stage_for

    cfg = load_config(MED_MOE_TINY, [], check_paths=False)
    stages = {name: stage_for(cfg, name) for name in cfg.stages}
    assert {n: type(s) for n, s in stages.items()} == {
        "stage1": VLMStage,
        "stage2": VLMStage,
        "router": RouterStage,
        "stage3": VLMStage,
    }
    assert [n for n, s in stages.items() if not s.evaluated] == ["router"]  # the LLM is unchanged
    medplib = load_config(MEDPLIB_TINY, [], check_paths=False)
    assert all(type(stage_for(medplib, n)) is GroundingStage for n in medplib.stages)  # the MoE stage too


def test_router_stage_lookup_without_torch_side_effects() -> None:
    from pipeline.stages.kinds import router_stage_of, router_stages

    cfg = load_config(MED_MOE_TINY, [], check_paths=False)
    assert router_stages(cfg) == ["router"] and router_stages(cfg, before="router") == []
    assert router_stage_of(cfg, "stage3") == "router"


@pytest.mark.parametrize("router_trainable", [False, True])
def test_moe_stage_decides_router_training_up_front(router_trainable: bool, tiny_llama, tiny_clip) -> None:
    """Routers inside a trained group (``llm``) stay frozen unless ``moe.router_trainable``; the counts the
    stage returns are those of the parameters that actually train."""
    from pipeline.model_factory import build_model
    from pipeline.stages import stage_for
    from pipeline.trainable import parameter_groups

    cfg = load_config(
        MED_MOE_TINY,
        [
            "stages.stage3.train=[connector,llm]",
            "stages.stage3.moe.router_init=random",  # no router stage hand-over needed
            f"stages.stage3.moe.router_trainable={str(router_trainable).lower()}",
        ],
        check_paths=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    stage = stage_for(cfg, "stage3")
    stage.prepare(model, {})
    counts = stage.set_trainable(model)
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    routers = set(groups["moe_router"])
    assert routers and all(params[n].requires_grad == router_trainable for n in routers)
    trained = {n for n, p in params.items() if p.requires_grad}
    assert counts["connector"] == sum(params[n].numel() for n in groups["connector"])
    assert counts["llm"] == sum(params[n].numel() for n in groups["llm"] if n in trained)
    router_count = sum(params[n].numel() for n in routers)
    if router_trainable:
        assert counts["moe_router"] == router_count
    else:
        assert "moe_router" not in counts
        assert counts["llm"] == sum(params[n].numel() for n in groups["llm"]) - router_count
