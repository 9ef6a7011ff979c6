"""A tiny one-stage experiment and torchrun launches of it, shared by the scaling tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKER = Path(__file__).resolve().parent / "ddp_worker.py"

EXPERIMENT = """\
defaults: [{defaults}]
name: scaling
model:
  connector: {{type: mlp, aggregation: avgpool}}
data:
  datasets:
    phantoms:
      format: slake
      path: {data}
      synthetic: {{train_images: 24, val_images: 2, test_images: 7, questions_per_image: 1, seed: 4}}
  batch_size: 4
stages:
  train:
    train: [connector, llm]
    optim: {{lr: 1.0e-3, warmup_ratio: 0.0, scheduler: constant}}
    max_epochs: 1
evaluation:
  max_new_tokens: 6
  batch_size: 2
trainer:
  accelerator: cpu
  devices: 1
  enable_progress_bar: true
  log_every_n_steps: 1
mlflow:
  experiment_name: scaling
  system_metrics: false
  register_model: false
"""


def write_experiment(tmp: Path, data: Path) -> Path:
    """The experiment YAML (its synthetic data in ``data``, written on first use and then shared)."""
    path = tmp / "scaling.yaml"
    path.write_text(EXPERIMENT.format(defaults=REPO / "experiments" / "defaults.yaml", data=data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    return env


def torchrun(*, nproc: int, nnodes: int = 1, node_rank: int = 0, port: int, log_dir: Path) -> list[str]:
    """torchrun with every rank's stdout / stderr in ``log_dir/<attempt>/<rank>/``."""
    return [
        str(VENV_BIN / "torchrun"),
        f"--nproc_per_node={nproc}",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        f"--log-dir={log_dir}",
        "--redirects=3",
        "--max-restarts=0",
    ]


def rank_logs(log_dir: Path, rank: int) -> str:
    """Everything one (local) rank wrote to stdout and stderr under torchrun's --log-dir."""
    files = sorted(log_dir.rglob(f"attempt_0/{rank}/std*.log"))
    return "".join(f.read_text() for f in files)


def run(cmd: list[str], *, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    return done
