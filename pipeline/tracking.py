"""MLflow wiring: one parent run per experiment, one nested run per stage, rank 0 only.

The tracking URI is always passed explicitly (Lightning's MLFlowLogger would otherwise read
MLFLOW_TRACKING_URI at import time).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0 and \
        int(os.environ.get("LOCAL_RANK", 0)) == 0


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Dotted key -> string value for every leaf, values clipped to MLflow's length limit."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        text = json.dumps(node) if isinstance(node, list) else str(node)
        out[prefix[:-1]] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


class Tracker:
    """Creates the runs and hands Lightning an MLFlowLogger bound to each stage's nested run."""

    def __init__(self, *, tracking_uri: str, experiment_name: str) -> None:
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow resets its level on import
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.enabled = is_rank_zero()
        self.client = MlflowClient(tracking_uri=tracking_uri) if self.enabled else None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def _experiment(self) -> str:
        if self.experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = (found.experiment_id if found is not None
                                  else self.client.create_experiment(self.experiment_name))
        return self.experiment_id

    def start_parent(self, *, run_name: str, cfg: DictConfig, tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(self._experiment(), run_name=run_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.log_config(self.parent_run_id, cfg)
        return self.parent_run_id

    def start_child(self, *, run_name: str, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {"mlflow.parentRunId": self.parent_run_id or "", **(tags or {})}
        return self.client.create_run(self._experiment(), run_name=run_name, tags=tags).info.run_id

    def lightning_logger(self, run_id: str | None):
        """Lightning logger writing into ``run_id`` (None on ranks other than 0)."""
        if not self.enabled or run_id is None:
            return False
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=self.experiment_name, tracking_uri=self.tracking_uri,
                            run_id=run_id, log_model=False)

    def log_config(self, run_id: str, cfg: DictConfig) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if not self.enabled or run_id is None:
            return
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status)


def temp_artifact_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="medpipe-artifacts-")
