"""The Uni-Med recipe, its ablation deltas and the CPU-tiny version of each (a few training steps)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from uni_med_runs import UNI_MED, tiny_overrides

from pipeline.config import ConfigError, load_config

ABLATIONS = sorted(p.stem for p in (UNI_MED / "ablations").glob("*.yaml"))
# what each ablation changes over the recipe (besides its name / output_dir)
DELTAS = {
    "mlp": {"model.connector.type": "mlp"},
    "cmoe_e3": {"model.connector.num_experts": 3},
    "cmoe_e5": {},
    "cmoe_e8": {"model.connector.num_experts": 8},
    "router_token": {"model.connector.router_input": "token"},
    "router_task": {"model.connector.router_input": "task"},
    "weighting_sparse": {"model.connector.weighting": "sparse"},
    "weighting_hard": {"model.connector.weighting": "hard"},
    "weighting_constant": {"model.connector.weighting": "constant"},
}


def flat(cfg) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def test_recipe_has_the_papers_settings() -> None:
    cfg = load_config(UNI_MED / "recipe.yaml", check_paths=False)
    assert cfg.model.vision.path == "timm:eva_giant_patch14_clip_224"
    connector = cfg.model.connector
    assert (
        connector.type,
        connector.aggregation,
        connector.num_experts,
        connector.router_input,
        connector.weighting,
        connector.router_hidden_ratio,
        connector.num_tasks,
    ) == ("cmoe", "concat4", 5, "task_token", "soft", 4.0, 6)
    (stage,) = cfg.stages.values()
    assert list(stage.train) == ["connector", "lora"]  # vision and the LLM base frozen
    assert (stage.lora.r, stage.lora.alpha, stage.lora.dropout, list(stage.lora.target_modules)) == (
        8,
        16,
        0.05,
        ["all-linear"],
    )
    assert (stage.optim.weight_decay, stage.optim.scheduler, stage.optim.lr) == (0.05, "cosine", 1e-5)
    assert (stage.optim.warmup_steps, stage.optim.warmup_ratio) == (5000, 0.0)  # the released warmup (T:160)
    assert cfg.data.mixture.one_task_per_batch and cfg.data.prompt_templates and cfg.data.task_prefix
    assert {ds.task for ds in cfg.data.datasets.values()} == {"vqa", "refer", "identify", "caption", "cls", "qa"}


def test_every_ablation_is_a_small_delta_with_a_tiny_version() -> None:
    assert ABLATIONS == sorted(DELTAS)
    assert sorted(p.stem for p in (UNI_MED / "tiny").glob("*.yaml")) == ABLATIONS
    recipe = flat(load_config(UNI_MED / "recipe.yaml", check_paths=False))
    for name in ABLATIONS:
        ablation = flat(load_config(UNI_MED / "ablations" / f"{name}.yaml", check_paths=False))
        changed = {
            k: v
            for k, v in ablation.items()
            if recipe.get(k) != v and k not in ("name", "output_dir") and not k.startswith("data.datasets.")
        }  # dataset paths follow output_dir
        assert changed == DELTAS[name], name
        assert len((UNI_MED / "ablations" / f"{name}.yaml").read_text().splitlines()) <= 8


def test_bad_task_count_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"num_tasks.*'cls'.*task id 4"):
        load_config(UNI_MED / "tiny.yaml", ["model.connector.num_tasks=4"])


def test_timm_tower_needs_a_local_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.vision\.checkpoint"):
        load_config(UNI_MED / "tiny.yaml", ["model.vision.path=timm:eva_giant_patch14_clip_224"])
    with pytest.raises(ConfigError, match=r"model\.vision\.checkpoint.*not found"):
        load_config(
            UNI_MED / "tiny.yaml",
            ["model.vision.path=timm:eva_giant_patch14_clip_224", f"model.vision.checkpoint={tmp_path}/missing.pth"],
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DELTAS))
def test_tiny_ablation_trains_a_few_steps(name: str, tmp_path: Path, uni_med_data: Path, tiny_llama, tiny_clip) -> None:
    """Each tiny ablation: config -> model -> six-task data -> 3 training steps + 1 validation batch."""
    from lightningmodules.models.cmoe import CMoEConnector
    from lightningmodules.vlm_module import VLMModule
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect
    from pipeline.trainable import add_lora, set_trainable

    cfg = load_config(UNI_MED / "tiny" / f"{name}.yaml", tiny_overrides(tmp_path, data_dir=uni_med_data))
    L.seed_everything(0, verbose=False)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    connector = built.model.connector
    assert isinstance(connector, CMoEConnector) == (name != "mlp")
    (stage,) = cfg.stages.values()
    add_lora(built.model, stage.lora)
    set_trainable(built.model, list(stage.train))
    dm = connect(build_datamodule(cfg, list(stage.datasets)), built)  # the six tiny tasks
    module = VLMModule(
        model=built.model,
        tokenizer=built.tokenizer,
        lr=stage.optim.lr,
        weight_decay=stage.optim.weight_decay,
        warmup_ratio=stage.optim.warmup_ratio,
        task_names=["vqa", "refer", "identify", "caption", "cls", "qa"],
    )
    before = {k: v.detach().clone() for k, v in built.model.connector.named_parameters()}
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        val_check_interval=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert any(not torch.equal(before[k], v) for k, v in built.model.connector.named_parameters())
    if name == "mlp":
        assert module.routing is None
        return
    table = module.routing_table  # the first validation batch: VQA images (task 0)
    assert table is not None and torch.isfinite(table[0]).all()
    torch.testing.assert_close(table[0].sum(), torch.tensor(1.0))
    if name == "weighting_hard":
        torch.testing.assert_close(table[0], torch.eye(connector.num_experts)[0])  # task 0 -> expert 0
    if name == "weighting_constant":
        torch.testing.assert_close(table[0], torch.full((connector.num_experts,), 1 / connector.num_experts))
    stats, record = module.moe.context.stats[connector], module.moe.context.routing[connector]  # last step
    tokens = record.weights.shape[:2].numel()  # N*P visual tokens of the last forward
    if name == "weighting_sparse":  # dispatched: each expert ran on exactly its kept rows, 2 per token
        assert stats.computed_rows == stats.kept_counts.tolist()
        assert sum(stats.computed_rows) == int(stats.kept_counts.sum()) == 2 * tokens
    elif name == "weighting_hard":  # dispatched: one expert per token
        assert stats.computed_rows == stats.kept_counts.tolist()
        assert sum(stats.computed_rows) == tokens
    else:  # soft / constant: the dense mix runs every expert on every token
        assert stats.computed_rows == [tokens] * connector.num_experts
