"""Fixtures of the grounding tests: a tiny SAM checkpoint built once per session in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LLM_HIDDEN = 24  # stands in for the LLM's hidden size


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.zoo import ensure_tiny

    return ensure_tiny("sam", tmp_path_factory.mktemp("medpipe_cache"))


@pytest.fixture
def head(tiny_sam_dir: Path):
    from lightningmodules.models.grounding import GroundingHead, load_sam

    torch.manual_seed(0)
    return GroundingHead(sam=load_sam(tiny_sam_dir), llm_hidden_size=LLM_HIDDEN)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
