"""The demo as a user runs it: learns the synthetic task well above the majority baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_learns_and_keeps_the_console_clean(tmp_path: Path, tiny_llama, tiny_clip) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the results table and the way into MLflow
    assert "closed acc" in proc.stdout and "majority closed" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}" in proc.stdout
    # no warning walls: neither Python warnings nor library log spam reach the console
    noisy = [line for line in proc.stderr.splitlines() if "Warning" in line or "warn(" in line]
    assert not noisy, noisy[:5]

    metrics = json.loads((out / "stages" / "instruct" / "eval" / "metrics.json").read_text())
    model, baseline = metrics["metrics"], metrics["majority_baseline"]
    assert metrics["n_scored"] == metrics["n_expected"] == 360 and metrics["n_skipped"] == 0
    assert model["closed_accuracy"] >= 0.90, model
    assert model["open_recall"] >= 0.70, model
    assert model["closed_accuracy"] >= baseline["closed_accuracy"] + 0.25, (model, baseline)
    assert model["open_recall"] >= baseline["open_recall"] + 0.3, (model, baseline)
