"""Fixtures of the MoE tests: both FFN families, a fixed seed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["llama", "phi"])
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
