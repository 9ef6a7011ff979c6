"""``medpipe params`` / ``medpipe memory``: one builder (``build_model(weights="none")``), one structure
replay, the recipes from experiments/ - counted against the models the runner path builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightningmodules.models.moe import count_parameters
from pipeline.config import load_config
from pipeline.memory import experiment_memory, stage_counts
from pipeline.model_factory import build_model
from pipeline.params import experiment_params
from pipeline.structure import apply_stage_structure, stage_structure, structure_after
from pipeline.trainable import add_lora, parameter_groups

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
OVERLAYS = {"defaults.yaml", "uni_med/cpu_tiny.yaml"}  # listed in other files' defaults, not experiments
RECIPES = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if p.relative_to(EXPERIMENTS).as_posix() not in OVERLAYS)


def tiny_config(path: Path, *overrides: str):
    """The experiment at tiny size: tiny CLIP, Llama (and SAM) in place of the papers' checkpoints."""
    cfg = load_config(path, [], check_paths=False)
    tiny = ["model.vision.path=tiny:clip", "model.vision.checkpoint=null", "model.llm.path=tiny:llama"]
    tiny += ["model.llm.dtype=float32", "model.llm.gradient_checkpointing=false"]
    if cfg.model.get("grounding") is not None:
        tiny += ["model.grounding.sam_path=tiny:medsam", "model.grounding.sam_format=hf"]
    return load_config(path, [*tiny, *overrides], check_paths=False)


def runner_model(cfg, stage: str | None) -> nn.Module:
    """The model the runner trains in ``stage``: checkpoints loaded, then each stage's structure applied in
    order with what the runner passes (a classifier for the routers, the source stages' LLMs)."""
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    names = list(cfg.stages.keys())
    for name in names[: names.index(stage) + 1] if stage else []:
        moe = cfg.stages[name].moe
        weights = {}
        if moe is not None and moe.router_init == "modality_classifier":
            weights["router_init"] = nn.Linear(model.llm.config.hidden_size, moe.num_experts)
        if moe is not None and moe.sources:
            weights["sources"] = [build_model(cfg.model, cache_dir=cfg.cache_dir).model.llm for _ in moe.sources]
        apply_stage_structure(cfg, name, model, **weights)
    return model


def test_every_recipe_is_found() -> None:
    names = {p.relative_to(EXPERIMENTS).as_posix() for p in RECIPES}
    assert {"med_moe/stage3.yaml", "medplib/medplib.yaml", "uni_med/recipe.yaml", "demo.yaml"} <= names
    assert len(RECIPES) >= 30


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(EXPERIMENTS).as_posix())
def test_params_equal_the_runner_built_model(path: Path) -> None:
    cfg = tiny_config(path)
    result = experiment_params(cfg)
    stage = result["stage"]
    assert stage == (list(cfg.stages.keys())[-1] if cfg.stages else None)
    torch.manual_seed(0)
    model = runner_model(cfg, stage)
    expected = count_parameters(model)
    assert result["total"] == expected["total"] == sum(p.numel() for p in model.parameters())
    assert result["active_per_token"] == expected["active_per_token"]
    assert result["moe_layers"] == expected["moe_layers"]
    for part, count in result["parts"].items():
        assert count == sum(p.numel() for p in getattr(model, part).parameters()), part
    if cfg.model.get("grounding") is not None:  # the grounding head (SAM + SEG projection) and region adapter
        assert result["parts"]["grounding"] > 0 and result["parts"]["grounding"] == sum(
            p.numel() for p in model.grounding.parameters()
        )


def test_structure_after_follows_init_from() -> None:
    cfg = tiny_config(EXPERIMENTS / "medplib" / "medplib.yaml", "stages.moe.init_from=language_expert")
    assert structure_after(cfg, "moe") == stage_structure(cfg, "moe")  # no earlier stage changed the structure
    cfg = tiny_config(EXPERIMENTS / "med_moe" / "tiny.yaml")
    entries = structure_after(cfg, "stage3")
    assert [e["kind"] for e in entries] == ["modality_classifier", "moe"]
    assert entries[1]["layers"] == "every_other" and entries[1]["num_experts"] == 3


def test_memory_counts_equal_the_runner_built_model() -> None:
    """Totals and trainable parameters per stage, from the YAML's train lists, against the runner's model."""
    cfg = tiny_config(EXPERIMENTS / "med_moe" / "tiny.yaml")
    for stage in cfg.stages:
        counts = stage_counts(cfg, stage)
        model = runner_model(cfg, stage)
        assert counts.total == sum(p.numel() for p in model.parameters()), stage
        groups = parameter_groups(model)
        params = dict(model.named_parameters())
        trained = set().union(*(groups[g] for g in cfg.stages[stage].train)) - set(groups["moe_router"])
        assert counts.trainable == sum(params[n].numel() for n in trained), stage  # routers frozen (stage 3)
        assert counts.layers == model.llm.config.num_hidden_layers and counts.hidden == model.llm.config.hidden_size
    assert stage_counts(cfg, "stage3").ffn_scale == 2  # top-1 + the meta expert


def test_memory_lora_counts_rank_times_in_plus_out() -> None:
    """A LoRA stage trains r (in + out) per Linear of the LLM (every Linear but lm_head for all-linear)."""
    cfg = tiny_config(EXPERIMENTS / "uni_med" / "tiny.yaml")
    counts = stage_counts(cfg, "uni_med")
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    r = cfg.stages.uni_med.lora.r
    lora = sum(
        r * (m.in_features + m.out_features)
        for n, m in model.llm.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in n
    )
    connector = sum(p.numel() for p in model.connector.parameters())
    assert counts.trainable == connector + lora
    assert counts.total == sum(p.numel() for p in model.parameters()) + lora
    add_lora(model, cfg.stages.uni_med.lora)
    assert counts.total == sum(p.numel() for p in model.parameters())


def test_memory_follows_the_train_list_in_the_yaml(tmp_path: Path) -> None:
    base = EXPERIMENTS / "med_moe" / "tiny.yaml"
    before = experiment_memory(tiny_config(base), devices=2, micro_batch=2, seq_len=64)
    changed = tmp_path / "connector_only.yaml"
    changed.write_text(f"defaults: [{base}]\nstages:\n  stage2:\n    train: [connector]\n")
    after = experiment_memory(tiny_config(changed), devices=2, micro_batch=2, seq_len=64)
    assert list(after) == list(before) == ["stage1", "stage2", "router", "stage3"]
    assert after["stage2"]["params_trainable"] < before["stage2"]["params_trainable"]
    assert after["stage2"]["total_gb"] < before["stage2"]["total_gb"]
    assert after["stage2"]["params_trainable"] == before["stage1"]["params_trainable"]  # connector only
    for stage in ("stage1", "router", "stage3"):
        assert after[stage] == before[stage]
    override = experiment_memory(
        tiny_config(base, "stages.stage2.train=[connector]"), devices=2, micro_batch=2, seq_len=64
    )
    assert override == after


def test_memory_command_reads_a_config(capsys) -> None:
    from pipeline.cli import main

    tiny = [
        "model.vision.path=tiny:clip",
        "model.llm.path=tiny:llama",
        "model.llm.dtype=float32",
        "stages.stage2.train=[connector]",
    ]
    assert main(["memory", str(EXPERIMENTS / "med_moe" / "stage2.yaml"), *tiny, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["med_moe"]
    assert list(table) == ["stage1", "stage2"]
    assert table["stage2"]["params_trainable"] == table["stage1"]["params_trainable"]


# -- the papers' recipes as shipped: no checkpoints on this machine --------------------------------------


def test_params_of_the_paper_recipes_without_checkpoints() -> None:
    """Built on meta from the built-in architectures: Phi-2 + CLIP ViT-L/14-336, 16 of 32 layers with 4
    upcycled experts + the meta expert; Vicuna-7B + SAM-Med2D with 2 experts in every layer; Llama-2-7B +
    EVA-CLIP-g + CMoE."""
    for folder in ("/models/phi-2", "/models/vicuna-7b-v1.5", "/models/Llama-2-7b-chat-hf"):
        if Path(folder).exists():
            pytest.skip(f"{folder} exists: this test checks the built-in architectures")
    med_moe = experiment_params(load_config(EXPERIMENTS / "med_moe" / "stage3.yaml", [], check_paths=False))
    assert med_moe["stage"] == "stage3" and med_moe["device"] == "meta" and med_moe["moe_layers"] == 16
    phi2_ffn = 2 * 2560 * 10240 + 10240 + 2560  # fc1 + fc2 with biases
    assert med_moe["experts_total"] == 16 * 4 * phi2_ffn and med_moe["meta_experts"] == 16 * phi2_ffn
    assert 6.4e9 < med_moe["total"] < 6.5e9  # as `medpipe memory` estimated it before (6.4488 B)
    assert med_moe["active_fraction"] == pytest.approx(0.61, abs=0.01)
    assert 3.0e8 < med_moe["parts"]["vision"] < 3.1e8  # CLIP ViT-L/14-336: 303.5 M

    medplib = experiment_params(load_config(EXPERIMENTS / "medplib" / "medplib.yaml", [], check_paths=False))
    assert medplib["stage"] == "moe" and medplib["moe_layers"] == 32 and medplib["meta_experts"] == 0
    assert 11.4e9 < medplib["total"] < 11.6e9
    assert 9.0e7 < medplib["parts"]["grounding"] < 1.2e8  # SAM-Med2D ViT-B + the SEG projection
    assert medplib["parts"]["region"] > 0

    uni_med = experiment_params(load_config(EXPERIMENTS / "uni_med" / "recipe.yaml", [], check_paths=False))
    assert uni_med["moe_layers"] == 0 and uni_med["active_fraction"] == 1.0
    assert 1.0e9 < uni_med["parts"]["vision"] < 1.02e9  # EVA-CLIP ViT-g/14: 1.01 B
    assert 6.7e9 < uni_med["parts"]["llm"] < 6.8e9


def test_params_and_memory_commands_on_paper_recipes() -> None:
    params = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "params", "experiments/med_moe/stage3.yaml", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert params.returncode == 0, params.stderr
    if not Path("/models/phi-2").exists():
        assert "model.llm.path /models/phi-2 not found: using the built-in phi-2 architecture" in params.stderr
    assert json.loads(params.stdout)["stage"] == "stage3"
    memory = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "memory", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert memory.returncode == 0, memory.stderr
    tables = json.loads(memory.stdout)
    assert sorted(tables) == ["med_moe_phi2", "med_moe_stablelm", "medplib", "uni_med"]
    assert list(tables["medplib"]) == ["alignment", "language_expert", "grounding_expert", "moe"]
    assert tables["med_moe_phi2"]["stage3"]["params_total"] == pytest.approx(6.4488, abs=0.001)
