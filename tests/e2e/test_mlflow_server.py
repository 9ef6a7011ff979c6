"""A real `mlflow server` over HTTP: a tiny experiment logs to it, MlflowClient reads everything back."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from runs import tiny_server_overrides

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """`mlflow server` on 127.0.0.1 (free port, sqlite backend, proxied artifacts in a temp dir)."""
    port = free_port()
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (open for the server's lifetime, closed below)
    server = subprocess.Popen(
        [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_tiny_experiment_against_a_real_tracking_server(
    mlflow_server: str, tmp_path: Path, tiny_llama, tiny_clip
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.registry import load_registered
    from pipeline.runner import run_experiment

    cfg = load_config(DEMO, tiny_server_overrides(tmp_path, mlflow_server, experiment="server"))
    result = run_experiment(cfg)

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = runs["demo"]
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    for stage in ("align", "instruct"):  # nested under the experiment run
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[stage].info.status == "FINISHED"
    # params: the resolved config, flattened
    assert parent.data.params["stages.align.optim.lr"] == "0.002"
    assert parent.data.params["model.connector.type"] == "mlp"
    # metrics: every training step of each stage, and the evaluation of the last stage
    steps = [m.step for m in client.get_metric_history(runs["align"].info.run_id, "train/loss")]
    assert steps == list(range(len(result.stages[0].losses))) and len(steps) == 2
    instruct = client.get_run(runs["instruct"].info.run_id)
    assert instruct.data.metrics["eval/closed_accuracy"] == pytest.approx(
        result.stages[-1].evaluation.metrics["closed_accuracy"]
    )
    # artifacts went through the server's artifact proxy
    parent_files = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "model", "results"} <= parent_files
    eval_files = {f.path for f in client.list_artifacts(runs["instruct"].info.run_id, "evaluation")}
    assert {"evaluation/predictions.jsonl", "evaluation/metrics.json"} <= eval_files
    assert (tmp_path / "artifacts").is_dir() and any((tmp_path / "artifacts").rglob("handover.json"))
    # the registered model loads in one call, over HTTP
    assert result.model_uri == "models:/server-demo/1"
    assert client.get_model_version("server-demo", "1").run_id == parent.info.run_id
    built = load_registered(result.model_uri, tracking_uri=mlflow_server)
    import torch

    from pipeline.handover import load_handover

    handover = load_handover(result.stages[-1].handover)["state_dict"]
    loaded = built.model.state_dict()
    key = next(k for k in handover if k.startswith("connector"))
    assert torch.equal(loaded[key], handover[key])
