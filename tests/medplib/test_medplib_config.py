"""The MedPLIB recipe files: stage order, the paper's weights, and the grounding config checks."""

from __future__ import annotations

import pytest
from medplib_helpers import REPO

from pipeline.config import ConfigError, load_config

RECIPE = REPO / "experiments" / "medplib" / "medplib.yaml"
TINY = REPO / "experiments" / "medplib" / "tiny.yaml"


def test_recipe_has_the_four_stages_with_the_papers_settings() -> None:
    cfg = load_config(RECIPE, check_paths=False)
    assert list(cfg.stages) == ["alignment", "language_expert", "grounding_expert", "moe"]
    stages = cfg.stages
    assert stages.alignment.train == ["connector"]
    assert stages.language_expert.lora.r == 16 and stages.language_expert.lora.target_modules == ["all-linear"]
    assert stages.grounding_expert.lora.r == 8
    assert stages.grounding_expert.lora.target_modules == ["mlp"]  # the FFN's Linears, any family (gate/up/down)
    assert "grounding" in stages.grounding_expert.train
    loss3, loss4 = stages.grounding_expert.grounding_loss, stages.moe.grounding_loss
    assert (loss3.ce, loss3.bce, loss3.dice) == (1.0, 1.0, 5.0) and (loss4.ce, loss4.bce, loss4.dice) == (1.0, 2.0, 0.5)
    moe = stages.moe.moe
    assert moe.layers == "all" and moe.top_k == 1 and not moe.meta_expert
    assert list(moe.sources) == ["grounding_expert", "language_expert"]  # expert 0 = III, expert 1 = II
    assert cfg.model.grounding.sam_format == "sam_med2d" and cfg.evaluation.mask_threshold == 0.1
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
