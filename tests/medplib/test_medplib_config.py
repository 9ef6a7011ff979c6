"""The MedPLIB recipe files: stage order, the paper's weights, and the grounding config checks."""

from __future__ import annotations

import pytest
from medplib_helpers import REPO

from pipeline.config import ConfigError, load_config

RECIPE = REPO / "experiments" / "medplib" / "medplib.yaml"
TINY = REPO / "experiments" / "medplib" / "tiny.yaml"


def test_recipe_has_the_four_stages_with_the_released_settings() -> None:
    """Values of the released scripts (MedPLIB 5ab54bc scripts/train_stage{2,3,4}.sh, train_ds_medplib.py)."""
    cfg = load_config(RECIPE, check_paths=False)
    assert list(cfg.stages) == ["alignment", "language_expert", "grounding_expert", "moe"]
    stages = cfg.stages
    assert stages.alignment.train == ["connector"]
    two, three, four = stages.language_expert, stages.grounding_expert, stages.moe
    assert (two.lora.r, two.lora.alpha, two.lora.target_modules) == (16, 16, ["attention", "mlp"])
    assert sorted(two.train) == ["connector", "embeddings", "lora", "norms"]  # region adapter frozen in II
    assert (three.lora.r, three.lora.alpha, three.lora.target_modules) == (8, 16, ["mlp"])
    assert sorted(three.train) == ["grounding", "lora"]
    assert (four.lora.r, four.lora.alpha, four.lora.target_modules) == (8, 16, ["q_proj", "v_proj", "experts"])
    assert sorted(four.train) == ["embeddings", "grounding", "lora", "moe_router", "region"]
    assert [(s.optim.lr, s.max_epochs) for s in (two, three, four)] == [(1e-4, 3), (3e-4, 10), (3e-4, 3)]
    for stage in (two, three, four):  # AdamW (0.9, 0.95), no decay, warmup 1% of one epoch, linear decay to 0
        optim = stage.optim
        assert list(optim.betas) == [0.9, 0.95] and optim.weight_decay == 0.0 and optim.scheduler == "linear"
        assert optim.warmup_ratio == pytest.approx(0.01 / stage.max_epochs, rel=0.01) and optim.min_lr_ratio == 0
    loss3, loss4 = three.grounding_loss, four.grounding_loss
    assert (loss3.ce, loss3.bce, loss3.dice, loss3.focal) == (1.0, 1.0, 5.0, 1.0)
    assert (loss4.ce, loss4.bce, loss4.dice, loss4.focal) == (1.0, 2.0, 0.5, 0.0)
    moe = four.moe
    assert moe.layers == "all" and moe.top_k == 1 and not moe.meta_expert and not moe.renormalize
    assert moe.router_trainable and not moe.router_bias and moe.router_init == "random" and moe.aux_loss_coef == 0
    assert (moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity) == (1.5, 2.0, 0)
    assert moe.drop_policy == "random" and moe.capacity_counts_padding
    assert list(moe.sources) == ["grounding_expert", "language_expert"]  # expert 0 = III, expert 1 = II
    assert cfg.model.grounding.sam_format == "sam_med2d" and cfg.evaluation.mask_threshold == 0.1
    assert cfg.evaluation.max_new_tokens == 1024 and cfg.evaluation.no_seg_mask == "last_answer_token"
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.accumulate_grad_batches == 128
    with pytest.raises(ConfigError, match="sam_path"):  # the placeholders are checked when paths are
        load_config(RECIPE)


def test_tiny_variant_is_the_same_chain(tmp_path) -> None:
    cfg = load_config(TINY, [f"output_dir={tmp_path}"])
    real = load_config(RECIPE, check_paths=False)
    assert list(cfg.stages) == list(real.stages)
    for name in cfg.stages:
        assert cfg.stages[name].train == real.stages[name].train
        assert cfg.stages[name].grounding_loss == real.stages[name].grounding_loss
    assert cfg.model.grounding.sam_path == "tiny:medsam"


def test_grounding_checks_name_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.grounding.sam_format"):
        load_config(TINY, [f"output_dir={tmp_path}", "model.grounding.sam_format=onnx"])
    with pytest.raises(ConfigError, match="stages.moe.grounding_loss.dice"):
        load_config(TINY, [f"output_dir={tmp_path}", "stages.moe.grounding_loss.dice=-1"])
    with pytest.raises(ConfigError, match="needs model.grounding"):
        load_config(TINY, [f"output_dir={tmp_path}", "model.grounding=null"])
