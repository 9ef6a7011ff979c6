"""Precision policy: frozen weights keep their load dtype, trainable weights train in float32 master copies.

A short stage at lr 2e-5 trains the whole tiny LLM; loaded in bfloat16 (under bf16-mixed autocast) it must
change as many weights as loaded in float32. Without master copies, AdamW's steps of ~lr are below half a
bf16 ulp of most weights and are rounded away (issue 14: 24.9% against 81.1% changed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from tests.runs import DEMO

MED_MOE_TINY = DEMO.parent / "med_moe" / "tiny.yaml"


def demo_overrides(tmp: Path, dtype: str, precision: str) -> list[str]:
    """The demo's instruct stage training the connector and the whole LLM for 4 steps at lr 2e-5."""
    return [
        f"output_dir={tmp}/out",
        f"model.llm.dtype={dtype}",
        f"trainer.precision={precision}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.save_checkpoints=false",
        "data.datasets.phantom_slake.synthetic.train_images=16",
        "data.datasets.phantom_slake.synthetic.val_images=2",
        "data.datasets.phantom_slake.synthetic.test_images=2",
        "data.batch_size=8",
        "stages.instruct.train=[connector,llm]",
        "stages.instruct.lora=null",
        "stages.instruct.optim.lr=2.0e-5",
        "stages.instruct.optim.warmup_ratio=0.0",
        "stages.instruct.optim.scheduler=constant",
    ]


def med_moe_overrides(tmp: Path, dtype: str, precision: str) -> list[str]:
    """Med-MoE's stage 3 (connector + every FFN: upcycled experts, meta expert) for 4 steps at lr 2e-5."""
    return [
        f"output_dir={tmp}/out",
        f"model.llm.dtype={dtype}",
        f"trainer.precision={precision}",
        "trainer.enable_progress_bar=false",
        "trainer.save_checkpoints=false",
        "data.datasets.phantom_slake.synthetic.train_images=16",
        "stages.stage3.moe.router_init=random",  # no router stage's hand-over needed
        "stages.stage3.optim.lr=2.0e-5",
        "stages.stage3.optim.warmup_ratio=0.0",
    ]


def fraction_changed(
    experiment: Path, stage_name: str, overrides: list[str], *, masters: bool = True
) -> tuple[float, dict[str, torch.dtype]]:
    """Fraction of the LLM's trainable elements 4 optimizer steps of the stage change, and every parameter's
    dtype as it trains. ``masters=False``: the trainable LLM weights put back in bfloat16 after
    ``set_trainable``, as they trained before the precision policy (the control)."""
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect
    from pipeline.stages import stage_for
    from pipeline.trainer_factory import build_trainer

    cfg = load_config(experiment, overrides)
    torch.manual_seed(0)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    stage = stage_for(cfg, stage_name)
    stage.prepare(built.model, {})
    stage.set_trainable(built.model)
    llm = {n: p for n, p in built.model.llm.named_parameters() if p.requires_grad}
    if not masters:
        for param in llm.values():
            param.data = param.data.bfloat16()
    before = {n: p.detach().clone() for n, p in llm.items()}
    dtypes = {n: p.dtype for n, p in built.model.named_parameters()}
    dm = connect(build_datamodule(cfg, list(stage.config.datasets)), built)
    trainer = build_trainer(cfg.trainer, max_steps=4, root_dir=Path(cfg.output_dir) / "trainer")
    trainer.fit(stage.module(built), datamodule=dm)
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in llm.items())
    return changed / sum(p.numel() for p in llm.values()), dtypes


@pytest.mark.slow
def test_bf16_loaded_llm_trains_as_many_weights_as_float32(tmp_path: Path, tiny_llama, tiny_clip) -> None:
    fp32, _ = fraction_changed(DEMO, "instruct", demo_overrides(tmp_path / "fp32", "float32", "32-true"))
    bf16, dtypes = fraction_changed(DEMO, "instruct", demo_overrides(tmp_path / "bf16", "bfloat16", "bf16-mixed"))
    control, _ = fraction_changed(
        DEMO, "instruct", demo_overrides(tmp_path / "control", "bfloat16", "bf16-mixed"), masters=False
    )
    llm = [n for n in dtypes if n.startswith("llm.")]
    assert llm and all(dtypes[n] == torch.float32 for n in llm)  # the whole LLM trains: float32 masters
    assert fp32 > 0.5
    assert bf16 >= 0.9 * fp32, f"bf16-loaded stage changed {bf16:.1%} of the LLM's weights, float32 {fp32:.1%}"
    assert control < 0.5 * fp32  # without masters most updates are rounded away (14.7% against 89.9% here)


@pytest.mark.slow
def test_bf16_loaded_moe_experts_train_as_many_weights_as_float32(tmp_path: Path, tiny_llama, tiny_clip) -> None:
    """The upcycled experts and meta expert (float32) run inside the bf16 layers under autocast."""
    fp32, _ = fraction_changed(MED_MOE_TINY, "stage3", med_moe_overrides(tmp_path / "fp32", "float32", "32-true"))
    bf16, dtypes = fraction_changed(
        MED_MOE_TINY, "stage3", med_moe_overrides(tmp_path / "bf16", "bfloat16", "bf16-mixed")
    )
    assert dtypes["llm.model.embed_tokens.weight"] == torch.bfloat16  # frozen: stays in its load dtype
    assert fp32 > 0.5 and bf16 >= 0.9 * fp32


def test_frozen_weights_keep_their_load_dtype_and_handovers_restore_into_it(
    tmp_path: Path, tiny_llama, tiny_clip
) -> None:
    """Only the trainable parameters are cast (a LoRA stage keeps the bf16 base: the memory saving); a
    hand-over holds what trained in float32 and restores into the load dtype of the model it loads into."""
    from pipeline.handover import restore, save_handover
    from pipeline.model_factory import build_model
    from pipeline.stages import stage_for

    overrides = ["model.llm.dtype=bfloat16", "model.vision.dtype=bfloat16", "trainer.precision=bf16-mixed"]
    cfg = load_config(DEMO, overrides, check_paths=False)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    assert all(p.dtype == torch.bfloat16 for p in built.model.vision.parameters())
    stage = stage_for(cfg, "instruct")  # connector + LoRA
    stage.prepare(built.model, {})
    stage.set_trainable(built.model)
    for name, param in built.model.llm.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    assert any(p.requires_grad for p in built.model.llm.parameters())

    stage_for(cfg, "align").set_trainable(built.model)  # connector only; the LLM stays bf16
    head = built.model.llm.get_output_embeddings().weight
    head.data = head.data.float()  # as a stage training the head leaves it
    head.data.add_(1e-4)
    path = save_handover(built.model, tmp_path / "handover.json", stage="s")
    fresh = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    stage.prepare(fresh, {})  # the same LoRA keys
    restore(fresh, path)
    restored = fresh.llm.get_output_embeddings().weight
    assert restored.dtype == torch.bfloat16
    assert torch.equal(restored, head.detach().bfloat16())


def test_half_weights_training_without_autocast_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'trainer.precision': stage instruct trains llm of the bfloat16"):
        load_config(DEMO, ["model.llm.dtype=bfloat16", "stages.instruct.train=[connector,llm]"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model.vision.dtype bfloat16: the float32 connector reads its features"):
        load_config(DEMO, ["model.vision.dtype=bfloat16"], check_paths=False)
    # LoRA casts its own input, bf16-mixed autocasts, *-true casts every weight: all accepted
    load_config(DEMO, ["model.llm.dtype=bfloat16"], check_paths=False)
    load_config(
        DEMO,
        ["model.llm.dtype=bfloat16", "stages.instruct.train=[llm]", "trainer.precision=bf16-mixed"],
        check_paths=False,
    )
    load_config(DEMO, ["model.vision.dtype=float16", "trainer.precision=bf16-true"], check_paths=False)


def test_memory_estimate_counts_frozen_half_weights_at_two_bytes(tiny_llama, tiny_clip) -> None:
    """``medpipe memory``: under bf16-mixed the frozen bf16 LLM costs 2 bytes a parameter, what trains 4."""
    from pipeline.memory import stage_counts, stage_memory

    cfg = load_config(DEMO, ["model.llm.dtype=bfloat16", "trainer.precision=bf16-mixed"], check_paths=False)
    align = stage_counts(cfg, "align")  # connector only
    assert align.frozen_half == align.parts["llm"]
    weights = stage_memory(align, devices=1, precision="bf16-mixed")["weights_gb"] * 1024**3
    assert weights == pytest.approx((align.total - align.frozen_half) * 4 + align.frozen_half * 2)
    fp32 = stage_counts(load_config(DEMO, [], check_paths=False), "align")
    assert fp32.frozen_half == 0 and fp32.total == align.total


def test_fsdp_with_half_weights_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'trainer.strategy': fsdp flattens .* set model.llm.dtype: float32"):
        load_config(
            DEMO,
            ["model.llm.dtype=bfloat16", "trainer.precision=bf16-mixed", "trainer.strategy=fsdp"],
            check_paths=False,
        )
