"""Shared fixtures: one tiny-model cache per checkout, built on first use, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The same numbers on every machine of a kind: AVX2 kernels in torch / MKL / oneDNN (set before torch's first
# kernel; subprocesses inherit them) and one intra-op thread (below), whatever OMP_NUM_THREADS says.
# pipeline/reproducibility.py has the why; the learning tests keep margins for what is left.
from pipeline.reproducibility import use_portable_cpu_kernels  # noqa: E402 (imports no torch)

use_portable_cpu_kernels()
TEST_THREADS = 1
os.environ.setdefault("MEDPIPE_CACHE", str(REPO / ".cache" / "medpipe"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture(scope="session", autouse=True)
def fixed_intra_op_threads():
    import torch

    torch.set_num_threads(TEST_THREADS)
    yield


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return Path(os.environ["MEDPIPE_CACHE"])


@pytest.fixture(scope="session")
def tiny_llama(cache_dir: Path) -> Path:
    from pipeline.zoo import ensure_tiny

    return ensure_tiny("llama", cache_dir)


@pytest.fixture(scope="session")
def tiny_clip(cache_dir: Path) -> Path:
    from pipeline.zoo import ensure_tiny

    return ensure_tiny("clip", cache_dir)


@pytest.fixture(scope="session")
def slake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic SLAKE-layout dataset shared by the tests that only read it."""
    from datamodules.writers.slake import write_slake

    root = tmp_path_factory.mktemp("slake")
    write_slake(root, n_train=24, n_val=6, n_test=8, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """The demo's two stages at tiny size, run once: (cfg, result, weight snapshots, tmp dir)."""
    from runs import run_tiny_demo

    return run_tiny_demo(tmp_path_factory.mktemp("tiny-demo"))


@pytest.fixture(scope="session")
def tiny_conflict_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """Demo stages with a two-task stage 2 logging gradient conflict: (cfg, result, tmp dir)."""
    from runs import run_tiny_conflict

    return run_tiny_conflict(tmp_path_factory.mktemp("tiny-conflict"))


@pytest.fixture(scope="session")
def tiny_med_moe_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """The tiny Med-MoE chain with the Llama family, run once: (cfg, result, weight snapshots, tmp dir)."""
    from runs import run_tiny_med_moe

    return run_tiny_med_moe(tmp_path_factory.mktemp("tiny-med-moe"), "llama")


@pytest.fixture(scope="session")
def tiny_cmoe_run(tmp_path_factory: pytest.TempPathFactory, tiny_med_moe_run):
    """A tiny Uni-Med CMoE-connector run logged into the tiny Med-MoE run's MLflow store (experiment
    ``uni-med-cmoe``), so one tracking URI holds both kinds of routing: (cfg, result)."""
    from runs import run_tiny_cmoe

    return run_tiny_cmoe(tmp_path_factory.mktemp("tiny-cmoe"), tracking_uri=tiny_med_moe_run[0].mlflow.tracking_uri)


@pytest.fixture(scope="session")
def tiny_grounding_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """The tiny MedPLIB grounding run (stage III on lesions), shared by its test and notebook 04."""
    from runs import run_tiny_grounding

    return run_tiny_grounding(tmp_path_factory.mktemp("medplib-grounding"))
