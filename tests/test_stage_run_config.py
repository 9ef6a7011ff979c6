"""A stage's own batch size, max length and gradient accumulation (the released scripts set them per stage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.stages import stage_for

REPO = Path(__file__).resolve().parents[1]


def test_medplib_stages_train_with_the_released_batch_length_and_accumulation() -> None:
    cfg = load_config(REPO / "experiments" / "medplib" / "medplib.yaml", check_paths=False)
    seen = {}
    for name in cfg.stages:
        run = stage_for(cfg, name).run_config()
        seen[name] = (run.data.batch_size, run.data.max_length, run.trainer.accumulate_grad_batches)
    # MedPLIB 5ab54bc scripts/train_stage{2,3,4}.sh: 16 x 2, 32 x 1, 4 x 8 on 4 GPUs; stage IV at 1024 tokens
    assert seen == {
        "alignment": (32, 2048, 1),
        "language_expert": (16, 2048, 2),
        "grounding_expert": (32, 2048, 1),
        "moe": (4, 1024, 8),
    }
    assert {b * a * cfg.trainer.devices for b, _, a in seen.values()} == {128}  # the same global batch
    assert cfg.data.batch_size == 32 and cfg.data.max_length == 2048  # the run's own values stay


def test_run_config_feeds_the_datamodule_and_the_trainer(tmp_path) -> None:
    from pipeline.runner import build_datamodule
    from pipeline.trainer_factory import build_trainer

    cfg = load_config(
        REPO / "experiments" / "med_moe" / "tiny.yaml",
        [f"output_dir={tmp_path}", "stages.stage1.max_length=64", "stages.stage1.accumulate_grad_batches=3"],
    )
    stage = stage_for(cfg, "stage1")
    run = stage.run_config()
    assert build_datamodule(run, list(stage.config.datasets)).max_length == 64
    assert build_trainer(run.trainer).accumulate_grad_batches == 3
    other = stage_for(cfg, "stage2").run_config()
    assert other is cfg and build_datamodule(other).max_length == cfg.data.max_length


@pytest.mark.parametrize("key", ["batch_size", "max_length", "accumulate_grad_batches"])
def test_bad_values_name_the_key(tmp_path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"stages\.stage1\.{key}.*> 0"):
        load_config(
            REPO / "experiments" / "med_moe" / "tiny.yaml", [f"output_dir={tmp_path}", f"stages.stage1.{key}=0"]
        )
