"""MLflow wiring: one parent run per experiment, one nested run per stage, rank 0 only.

The tracking URI is always passed explicitly (Lightning's MLFlowLogger would otherwise read
MLFLOW_TRACKING_URI at import time).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The tracking server cannot be used; raised before any training starts."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds when an HTTP tracking server does not answer.

    MLflow's own client retries with back-off for minutes; a user who mistyped a host should hear
    about it at once, before data or models are built.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.post(url, json={"max_results": 1}, timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); start it or set mlflow.tracking_uri"
        ) from None
    if response.status_code >= 400:
        raise TrackingError(
            f"MLflow tracking server {uri} answered HTTP {response.status_code}: {response.text.strip()[:200]}"
        )


def hardware_tags() -> dict[str, str]:
    import torch

    tags = {
        "hardware.platform": platform.platform(),
        "hardware.python": platform.python_version(),
        "hardware.cpu_count": str(os.cpu_count()),
        "hardware.torch_threads": str(torch.get_num_threads()),
        "hardware.cuda_devices": str(torch.cuda.device_count() if torch.cuda.is_available() else 0),
    }
    if torch.cuda.is_available():
        tags["hardware.gpu"] = torch.cuda.get_device_name(0)
    try:
        import psutil

        tags["hardware.memory_gb"] = f"{psutil.virtual_memory().total / 2**30:.1f}"
    except ImportError:
        pass
    return tags


def is_rank_zero() -> bool:
    """Global rank 0, from the launcher's environment (torchrun / SLURM set RANK / SLURM_PROCID; when
    Lightning launches the ranks itself, only LOCAL_RANK and NODE_RANK are set)."""
    env = os.environ
    return (
        int(env.get("RANK", env.get("SLURM_PROCID", 0))) == 0
        and int(env.get("LOCAL_RANK", 0)) == 0
        and int(env.get("NODE_RANK", env.get("GROUP_RANK", 0))) == 0
    )


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


def mlflow_metric_name(name: str) -> str:
    """MLflow accepts alphanumerics, ``_ - . / :`` and spaces in metric names: ``rec_acc@0.5`` -> ``rec_acc_at_0.5``."""
    return re.sub(r"[^0-9A-Za-z_\-./: ]", "_", name.replace("@", "_at_"))


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
            self.experiment_id = (
                found.experiment_id if found is not None else self.client.create_experiment(self.experiment_name)
            )
        return self.experiment_id

    def start_parent(self, *, run_name: str, cfg: DictConfig, tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        run = self.client.create_run(self._experiment(), run_name=run_name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.log_config(self.parent_run_id, cfg)
        return self.parent_run_id

    def resume_parent(self, run_id: str) -> str | None:
        """Continue an existing experiment run (``resume=true``): same run id, status back to RUNNING."""
        if not self.enabled:
            return None
        run = self.client.get_run(run_id)  # raises a clear MlflowException when the id is unknown
        self.experiment_id = run.info.experiment_id
        self.parent_run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def resume_child(self, run_id: str) -> str | None:
        if not self.enabled:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def start_child(self, *, run_name: str, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {"mlflow.parentRunId": self.parent_run_id or "", **(tags or {})}
        return self.client.create_run(self._experiment(), run_name=run_name, tags=tags).info.run_id

    def lightning_logger(self, run_id: str | None):
        """Lightning logger writing into ``run_id`` (None on ranks other than 0)."""
        if not self.enabled or run_id is None:
            return False
        return BufferedMLFlowLogger(
            experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, run_id=run_id, log_model=False
        )

    def log_config(self, run_id: str, cfg: DictConfig) -> None:
        self.log_params(run_id, flatten_config(cfg))
        self.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

    def log_params(self, run_id: str | None, params: dict[str, str]) -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=batch[i : i + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_name(k), float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if not self.enabled or run_id is None:
            return
        self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str | None, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table MLflow's UI shows in the run's Evaluation / Artifacts view."""
        if not self.enabled or run_id is None or not rows:
            return
        columns = list(rows[0])
        self.client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)

    def log_figure(self, run_id: str | None, figure: Any, artifact_file: str) -> None:
        if not self.enabled or run_id is None:
            return
        self.client.log_figure(run_id, figure, artifact_file)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if not self.enabled or run_id is None:
            return
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    @contextlib.contextmanager
    def system_metrics(
        self, run_id: str | None, enabled: bool, interval: float = 10.0, resume: bool = False
    ) -> Iterator[None]:
        """MLflow's CPU / memory / GPU sampling into ``run_id`` while the block runs (psutil needed).

        ``resume`` continues the run's system-metric steps instead of starting again at 0."""
        monitor = None
        if self.enabled and run_id is not None and enabled:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                monitor = SystemMetricsMonitor(
                    run_id, sampling_interval=interval, resume_logging=resume, tracking_uri=self.tracking_uri
                )
                monitor.start()
            except Exception as e:  # psutil missing or an unsupported platform: tracking goes on without
                log.warning("MLflow system metrics unavailable: %s", e)
                monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                monitor.finish()

    def register_model(self, run_id: str | None, *, name: str, files: dict[str, Path]) -> str | None:
        """Log ``files`` under ``model/`` of the run and register them as a new version of ``name``.

        Returns the ``models:/name/version`` URI; :func:`pipeline.registry.load_registered` loads it.
        """
        if not self.enabled or run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        for _artifact_name, path in files.items():
            self.client.log_artifact(run_id, str(path), "model")
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered: add a version
        version = self.client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
        return f"models:/{name}/{version.version}"

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status)


@functools.cache
def _buffered_logger_class():
    from lightning.pytorch.loggers import MLFlowLogger

    class _Buffered(MLFlowLogger):
        """MLFlowLogger that holds metrics back until the next checkpoint is on disk.

        A run killed between two checkpoints resumes from the earlier one and logs those steps again;
        held back, they reach MLflow once, so the history has no duplicated and no missing steps. A
        successful end flushes; a failed one drops what no checkpoint covers.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pending: list[tuple[dict[str, float], int | None]] = []
            self._covered = -1  # steps up to here are in a checkpoint on disk

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            self._pending.append((dict(metrics), step))
            # Lightning logs a step's metrics after on_train_batch_end, i.e. after that step's checkpoint
            if step is not None and step <= self._covered:
                self.flush()

        def flush(self) -> None:
            pending, self._pending = self._pending, []
            for metrics, step in pending:
                super().log_metrics(metrics, step)

        def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
            super().after_save_checkpoint(checkpoint_callback)
            saved = getattr(checkpoint_callback, "_last_global_step_saved", None)
            if saved is not None:
                self._covered = max(self._covered, saved - 1)  # the step just checkpointed logs as step - 1
            self.flush()

        def finalize(self, status: str = "success") -> None:
            if status == "failed":
                self._pending = []
            else:
                self.flush()
            super().finalize(status)

    return _Buffered


def BufferedMLFlowLogger(**kwargs: Any) -> Any:
    return _buffered_logger_class()(**kwargs)
