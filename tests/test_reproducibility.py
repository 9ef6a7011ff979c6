"""Same seed, same numbers: kernels, threads, the tiny-model cache and the random state around its builds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.reproducibility import PORTABLE_ENV, intra_op_threads, is_x86_64

REPO = Path(__file__).resolve().parent.parent


def test_a_tiny_build_leaves_the_callers_random_state_as_it_was(tmp_path: Path) -> None:
    """A cold cache (the build runs here) and a warm one must initialise the run's own weights identically."""
    from pipeline.zoo import cache_key, ensure_tiny

    def draws() -> tuple[list[float], float, float]:
        return torch.rand(4).tolist(), float(np.random.rand()), random.random()

    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = draws()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    threads = torch.get_num_threads()
    path = ensure_tiny("sam", tmp_path)  # builds: random init + save
    assert draws() == expected
    assert torch.get_num_threads() == threads
    inputs = json.loads((path / "build_inputs.json").read_text())
    assert inputs["build_threads"] == "1" and inputs["torch"] == torch.__version__
    assert path.name == f"sam-{cache_key('sam')}"


def test_the_cache_key_follows_what_decides_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.zoo import cache

    base = cache.cache_key("clip")
    assert cache.cache_key("clip") == base  # stable
    assert cache.cache_key("clip", threads=cache.BUILD_THREADS, sources=cache.BUILD_SOURCES["clip"]) == base
    assert cache.cache_key("clip", threads=2) != base
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert cache.cache_key("clip", threads=1) != base
    monkeypatch.undo()
    assert cache.cache_key("clip", sources=("datamodules/synthetic/phantoms.py",)) != base  # one source fewer


def test_intra_op_threads_sets_and_restores() -> None:
    saved = torch.get_num_threads()
    with intra_op_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == saved
    with intra_op_threads(None):
        assert torch.get_num_threads() == saved


def test_run_experiment_applies_num_threads(tmp_path: Path) -> None:
    from pipeline import runner
    from pipeline.config import load_config

    class Stop(Exception):
        pass

    seen = []

    def stop(name: str, model: torch.nn.Module) -> None:
        seen.append(torch.get_num_threads())
        raise Stop  # the first stage's model is built: nothing needs training

    overrides = [
        f"output_dir={tmp_path}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "trainer.num_threads=3",
    ]
    cfg = load_config(REPO / "experiments" / "demo.yaml", overrides)
    saved = torch.get_num_threads()
    with pytest.raises(Stop):
        runner.run_experiment(cfg, on_stage_start=stop)
    assert seen == [3] and torch.get_num_threads() == saved


def test_config_rejects_unknown_kernels_and_zero_threads(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    demo = REPO / "experiments" / "demo.yaml"
    with pytest.raises(ConfigError, match="trainer.cpu_kernels"):
        load_config(demo, [f"output_dir={tmp_path}", "trainer.cpu_kernels=fast"])
    with pytest.raises(ConfigError, match="trainer.num_threads"):
        load_config(demo, [f"output_dir={tmp_path}", "trainer.num_threads=0"])


@pytest.mark.skipif(not is_x86_64(), reason="the portable kernels pin x86-64 instruction sets")
def test_portable_kernels_take_effect_and_a_late_request_fails_clearly() -> None:
    """In a fresh process: portable pins torch to AVX2 even after imports; asked for after torch already ran
    wider kernels, it fails with one line saying which variables to set."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    code = """
import torch
from pipeline.reproducibility import apply_cpu_kernels
{before}
try:
    apply_cpu_kernels("portable")
    print("capability", torch.backends.cpu.get_cpu_capability())
except RuntimeError as e:
    print("error", e)
"""
    early = subprocess.run(
        [sys.executable, "-c", code.format(before="")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert "capability AVX2" in early.stdout, early.stdout + early.stderr
    native = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    late = subprocess.run(
        [sys.executable, "-c", code.format(before="torch.ones(3).sum()")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if native in ("AVX2", "DEFAULT"):  # nothing wider to fall back from on this CPU
        assert "capability" in late.stdout
    else:
        assert "error trainer.cpu_kernels=portable" in late.stdout and "ATEN_CPU_CAPABILITY=avx2" in late.stdout
