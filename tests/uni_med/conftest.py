"""Session fixtures: the six synthetic task datasets and one CPU-tiny Uni-Med run."""

from __future__ import annotations

from pathlib import Path

import pytest
from uni_med_runs import UNI_MED, TinyRun, run_recording_tasks, tiny_overrides


@pytest.fixture(scope="session")
def uni_med_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six synthetic task datasets, written by the first run that needs them."""
    return tmp_path_factory.mktemp("uni-med-data")


@pytest.fixture(scope="session")
def uni_med_tiny_run(tmp_path_factory: pytest.TempPathFactory, uni_med_data: Path, tiny_llama, tiny_clip) -> TinyRun:
    from pipeline.config import load_config

    tmp = tmp_path_factory.mktemp("uni-med-tiny")
    cfg = load_config(
        UNI_MED / "tiny.yaml",
        [
            *tiny_overrides(tmp, data_dir=uni_med_data),
            "data.mixture.samples_per_epoch=96",
            "stages.uni_med.max_epochs=3",
            "evaluation.max_new_tokens=24",
        ],
    )
    return run_recording_tasks(cfg, tmp)
