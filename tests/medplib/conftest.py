"""Fixtures of the MedPLIB integration tests: the tiny grounded model and synthetic MeCoVQA batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from medplib_helpers import tiny_cfg


@pytest.fixture(scope="module")
def grounded(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """(cfg, built model, datamodule) with the random tiny SAM; MeCoVQA phantoms written once."""
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect

    tmp = tmp_path_factory.mktemp("medplib-unit")
    cfg = tiny_cfg(
        tmp,
        "model.grounding.sam_path=tiny:sam",
        "data.datasets.mecovqa_complex.synthetic.train_images=24",
        "data.datasets.mecovqa_complex.synthetic.test_images=6",
        "data.datasets.mecovqa_region.synthetic.train_images=24",
        "data.datasets.mecovqa_region.synthetic.test_images=6",
        "data.datasets.mecovqa_grounding.synthetic.train_images=24",
        "data.datasets.mecovqa_grounding.synthetic.test_images=6",
    )
    torch.manual_seed(0)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    dm = connect(build_datamodule(cfg, ["mecovqa_complex", "mecovqa_region", "mecovqa_grounding"]), built)
    dm.prepare_data()
    dm.setup("fit")
    return cfg, built, dm
