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
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


class TrackingError(RuntimeError):
    """The tracking store cannot be used, or failed: one line naming the store and what failed (exit 1)."""

    exit_code = 1


class TrackingURIError(TrackingError):
    """``mlflow.tracking_uri`` names no usable store (scheme, path, host, not MLflow): exit 2, as a config error."""

    exit_code = 2


# what MLflow's SQLAlchemy stores accept (a driver may follow: postgresql+psycopg2://)
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
DATABRICKS_URIS = ("databricks", "databricks-uc", "uc")
SQLITE_HEADER = b"SQLite format 3\x00"
HTTP_JITTER = "0.5"  # seconds of random jitter added to each back-off (MLflow's default 1.0)


def http_settings(settings: Any) -> dict[str, str]:
    """MLflow's HTTP client environment from the ``mlflow`` config section: bounded retries, back-off and
    timeout (MLflow's defaults, 7 retries with back-off factor 2 and a 120 s timeout, retry for minutes),
    and no ``Retry-After`` honoured (a server asking for an hour would otherwise be waited for)."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(settings.http_retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(settings.http_backoff_factor)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": HTTP_JITTER,
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(settings.http_timeout)),
        "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
    }


def uri_scheme(uri: str) -> str:
    """``sqlite``, ``http``, ... (a driver suffix dropped); ``""`` for a bare path."""
    if uri in DATABRICKS_URIS:
        return "databricks"
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter
        return ""
    return match.group(1).split("+", 1)[0].lower()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory as MLflow reads it);
    None for an in-memory database or another scheme."""
    if uri_scheme(uri) != "sqlite":
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:  # sqlalchemy.exc.ArgumentError
        raise TrackingURIError(
            f"mlflow.tracking_uri {uri!r}: not a valid sqlite URL (sqlite:///path/mlflow.db)"
        ) from None
    return None if not database or database == ":memory:" else Path(database)


def _file_store_allowed() -> bool:
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes")


def check_uri_form(uri: str) -> None:
    """Refuse a tracking URI that names no store medpipe can use, without touching the network.

    Supported: ``sqlite:///path`` (the default), ``http(s)://`` servers, the other SQLAlchemy databases
    (``postgresql://``, ``mysql://``, ``mssql://``) and Databricks. A folder (``file://`` or a bare path,
    MLflow's file store) is refused: MLflow 3 keeps it in maintenance mode and refuses it itself unless
    ``MLFLOW_ALLOW_FILE_STORE=true``, which lets it through here too. Anything else (``ftp://``, ``s3://``)
    is refused. A sqlite URI must name a file that is an SQLite database, empty, or not there yet.
    """
    scheme = uri_scheme(uri)
    if scheme in ("", "file"):
        if _file_store_allowed():
            return
        where = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().absolute()
        database = where if where.suffix in (".db", ".sqlite", ".sqlite3") else where / "mlflow.db"
        raise TrackingURIError(
            f"mlflow.tracking_uri {uri!r}: a path (MLflow's file store) is not supported, MLflow keeps it in "
            f"maintenance mode; use a database, e.g. mlflow.tracking_uri=sqlite:///{database}, "
            "or an http(s):// server (MLFLOW_ALLOW_FILE_STORE=true lets the path through)"
        )
    if scheme in ("http", "https", "databricks") or scheme in DATABASE_SCHEMES[1:]:
        return
    if scheme != "sqlite":
        raise TrackingURIError(
            f"mlflow.tracking_uri {uri!r}: scheme '{scheme}' is not a tracking store; use sqlite:///path/mlflow.db, "
            "an http(s):// MLflow server or a database URL (postgresql://, mysql://, mssql://)"
        )
    path = sqlite_path(uri)
    if path is None:
        return
    if path.is_dir():
        raise TrackingURIError(f"mlflow.tracking_uri {uri!r}: {path} is a folder, not an SQLite database file")
    if path.is_file():
        try:
            with path.open("rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise TrackingURIError(f"mlflow.tracking_uri {uri!r}: cannot read {path} ({e.strerror or e})") from None
        if header and header != SQLITE_HEADER:
            raise TrackingURIError(
                f"mlflow.tracking_uri {uri!r}: {path} is not an SQLite database (it starts with {header[:8]!r}); "
                "point the URI at a new or an MLflow database file"
            )


def check_tracking_uri(
    uri: str, timeout: float = 5.0, *, settings: Any = None, experiment_name: str | None = None
) -> None:
    """Fail within ``timeout`` seconds when the tracking URI names no usable store.

    The URI's form first (:func:`check_uri_form`); an HTTP server must answer, and answer like MLflow:
    MLflow's own client retries with back-off for minutes, and a user who mistyped a host, or whose URI
    points at another service, should hear about it at once, before data or models are built.
    ``settings`` (the ``mlflow`` config section) bounds MLflow's HTTP retries for the rest of the process
    (:func:`http_settings`).
    """
    check_uri_form(uri)
    if settings is not None:
        os.environ.update(http_settings(settings))
        experiment_name = experiment_name or settings.experiment_name
    if uri_scheme(uri) not in ("http", "https"):
        return
    import requests

    base = uri.rstrip("/") + "/api/2.0/mlflow/experiments/"
    try:
        response = requests.post(base + "search", json={"max_results": 1}, timeout=timeout)
        if response.status_code < 400:
            probe = requests.get(
                base + "get-by-name", params={"experiment_name": experiment_name or "Default"}, timeout=timeout
            )
    except requests.RequestException as e:
        raise TrackingURIError(
            f"MLflow tracking server {uri} is unreachable ({type(e).__name__}); start it or set mlflow.tracking_uri"
        ) from None
    if response.status_code >= 400:
        raise TrackingURIError(
            f"MLflow tracking server {uri} answered HTTP {response.status_code}: {_one_line(response.text)}"
        )
    if not _answers_like_mlflow(probe):
        raise TrackingURIError(
            f"{uri} does not answer like an MLflow tracking server: GET {probe.request.path_url} answered HTTP "
            f"{probe.status_code} {_one_line(probe.text) or '(empty)'}; check mlflow.tracking_uri"
        )


def _answers_like_mlflow(response: Any) -> bool:
    """experiments/get-by-name: the experiment, or MLflow's error object (404 RESOURCE_DOES_NOT_EXIST)."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    if response.status_code == 200:
        return isinstance(body.get("experiment"), dict)
    return isinstance(body.get("error_code"), str)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def failure_reason(error: BaseException) -> str:
    """One line saying why a tracking call failed, from MLflow's, SQLAlchemy's, requests' or the OS's error."""
    message = str(error).strip()
    retries = re.search(r"too many (\d{3}) error responses", message)
    if retries:
        tries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")) + 1
        return f"the server answered HTTP {retries.group(1)} to {tries} tries (mlflow.http_retries)"
    if "Max retries exceeded" in message or "Read timed out" in message:
        cause = re.search(r"Caused by (\w+)\(", message)
        return f"no answer after {int(os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '7')) + 1} tries" + (
            f" ({cause.group(1)})" if cause else ""
        )
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    known = isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("mlflow", "sqlalchemy")
    reason = first if known and first else f"{type(error).__name__}: {first}".rstrip(": ")
    return _one_line(reason, 300)


@contextlib.contextmanager
def tracking_errors(uri: str, action: str) -> Iterator[None]:
    """Any failure of a tracking call becomes one :class:`TrackingError` naming the store and the action."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as e:
        reason = failure_reason(e)
        path = sqlite_path(uri) if uri_scheme(uri) == "sqlite" else None
        if path is not None and re.search(r"disk|space|I/O", reason, re.IGNORECASE):
            with contextlib.suppress(OSError):
                reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on {path.parent})"
        raise TrackingError(f"MLflow tracking store {uri}: {action} failed: {reason}") from e


STORE_LOCK_TIMEOUT = 300.0  # seconds a process waits for another to finish creating the same sqlite store


@contextlib.contextmanager
def store_init_lock(uri: str, timeout: float = STORE_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold ``<database>.lock`` (next to a sqlite database file) while the block runs; other URIs: nothing.

    MLflow creates and migrates a sqlite store's schema the first time a process opens it, with no lock
    of its own: two runs started at once on a fresh database both migrate, and one dies with an alembic
    error ("table _alembic_tmp_... already exists"). Around the first opening, one process holds an
    exclusive ``fcntl.flock`` on the lock file and migrates; the others wait for it (polling, at most
    ``timeout`` seconds), then find the schema in place. The kernel releases the lock when its holder
    exits, killed or not, so a crashed process never blocks the next one; the empty lock file stays.
    Linux / POSIX only (``fcntl``); on a network filesystem ``flock`` needs its lock support.
    Server databases (postgresql, ...) are not locked: their migrations run once, from ``mlflow db upgrade``
    or the first process.
    """
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl
    import time

    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # MLflow would create it too
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise TrackingError(f"MLflow tracking store {uri}: cannot create {path}.lock ({e.strerror or e})") from None
    try:
        deadline, waiting = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("MLflow store %s: another process is creating it; waiting", path)
                    waiting = True
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"MLflow tracking store {uri}: another process has held {path}.lock for over "
                        f"{timeout:.0f} s while creating the store"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def quiet_mlflow() -> None:
    """MLflow's logger at WARNING (its import resets the level), and its store's error log off: that log
    prints a traceback for every failing database call, which :func:`tracking_errors` reports in one line."""
    import mlflow  # noqa: F401 (the import configures mlflow's logger)

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` whose store exists: created (schema migrated) under :func:`store_init_lock`.

    Opening the tracking and the registry store in the lock means every later client of this process
    reuses the stores MLflow caches, and a second process finds the schema complete."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    check_uri_form(uri)
    with store_init_lock(uri), tracking_errors(uri, "opening the store"):
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the tracking store: creates / migrates its tables
        if uri_scheme(uri) in DATABASE_SCHEMES:
            client.search_registered_models(max_results=1)  # the registry store, same database
    return client


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
    """Creates the runs and hands Lightning an MLFlowLogger bound to each stage's nested run.

    Every call into MLflow runs under :func:`tracking_errors`: a store that fails (a server answering
    503, a database on a full disk, a server that is not MLflow) stops the run with one
    :class:`TrackingError` naming the store and the action, never a library traceback."""

    def __init__(self, *, tracking_uri: str, experiment_name: str) -> None:
        quiet_mlflow()
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.enabled = is_rank_zero()
        self.client = open_client(tracking_uri) if self.enabled else None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None

    def _guard(self, action: str) -> contextlib.AbstractContextManager[None]:
        return tracking_errors(self.tracking_uri, action)

    def _experiment(self) -> str:
        if self.experiment_id is None:
            with self._guard(f"finding experiment {self.experiment_name!r}"):
                found = self.client.get_experiment_by_name(self.experiment_name)
                self.experiment_id = (
                    found.experiment_id if found is not None else self.client.create_experiment(self.experiment_name)
                )
        return self.experiment_id

    def start_parent(self, *, run_name: str, cfg: DictConfig, tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        experiment = self._experiment()
        with self._guard("creating the experiment run"):
            run = self.client.create_run(experiment, run_name=run_name, tags=tags)
            self.parent_run_id = run.info.run_id
        self.log_config(self.parent_run_id, cfg)
        return self.parent_run_id

    def resume_parent(self, run_id: str) -> str | None:
        """Continue an existing experiment run (``resume=true``): same run id, status back to RUNNING."""
        if not self.enabled:
            return None
        with self._guard(f"resuming run {run_id}"):
            run = self.client.get_run(run_id)  # an unknown id: MLflow's RESOURCE_DOES_NOT_EXIST, one line
            self.experiment_id = run.info.experiment_id
            self.parent_run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def resume_child(self, run_id: str) -> str | None:
        if not self.enabled:
            return None
        with self._guard(f"resuming run {run_id}"):
            self.client.update_run(run_id, status="RUNNING")
        return run_id

    def start_child(self, *, run_name: str, tags: dict[str, str] | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = {"mlflow.parentRunId": self.parent_run_id or "", **(tags or {})}
        experiment = self._experiment()
        with self._guard(f"creating run {run_name!r}"):
            return self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id

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
        with self._guard("logging params"):
            for i in range(0, len(batch), 100):  # MLflow accepts at most 100 params per batch
                self.client.log_batch(run_id, params=batch[i : i + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_name(k), float(v), now, step or 0) for k, v in metrics.items()]
        with self._guard("logging metrics"):
            for i in range(0, len(batch), 1000):
                self.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if not self.enabled or run_id is None:
            return
        with self._guard(f"logging {artifact_file}"):
            self.client.log_text(run_id, text, artifact_file)

    def log_file(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or run_id is None:
            return
        with self._guard(f"logging {path}"):
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_table(self, run_id: str | None, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table MLflow's UI shows in the run's Evaluation / Artifacts view."""
        if not self.enabled or run_id is None or not rows:
            return
        columns = list(rows[0])
        with self._guard(f"logging {artifact_file}"):
            self.client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, artifact_file)

    def log_figure(self, run_id: str | None, figure: Any, artifact_file: str) -> None:
        if not self.enabled or run_id is None:
            return
        with self._guard(f"logging {artifact_file}"):
            self.client.log_figure(run_id, figure, artifact_file)

    def set_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if not self.enabled or run_id is None:
            return
        with self._guard("setting tags"):
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
                try:
                    monitor.finish()
                except Exception as e:  # the store failed meanwhile: the run's own calls say so
                    log.warning("MLflow system metrics: %s", failure_reason(e))

    def register_model(self, run_id: str | None, *, name: str, files: dict[str, Path]) -> str | None:
        """Log ``files`` under ``model/`` of the run and register them as a new version of ``name``.

        Returns the ``models:/name/version`` URI; :func:`pipeline.registry.load_registered` loads it.
        """
        if not self.enabled or run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        with self._guard(f"registering model {name!r}"):
            for _artifact_name, path in files.items():
                self.client.log_artifact(run_id, str(path), "model")
            try:
                self.client.create_registered_model(name)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # already registered: add a version
            version = self.client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
        return f"models:/{name}/{version.version}"

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        """Mark ``run_id`` terminated. A run that failed (status FAILED / KILLED) is closed on a best-effort
        basis: a store failing too is a warning, so the error that ended the run is the one reported."""
        if not self.enabled or run_id is None:
            return
        try:
            with self._guard(f"closing run {run_id}"):
                self.client.set_terminated(run_id, status)
        except TrackingError as e:
            if status == "FINISHED":
                raise
            log.warning("%s", e)


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
            with tracking_errors(self._tracking_uri, "logging metrics"):
                for metrics, step in pending:
                    super().log_metrics(metrics, step)

        def log_hyperparams(self, params: Any) -> None:
            with tracking_errors(self._tracking_uri, "logging params"):
                super().log_hyperparams(params)

        def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
            super().after_save_checkpoint(checkpoint_callback)
            saved = getattr(checkpoint_callback, "_last_global_step_saved", None)
            if saved is not None:
                self._covered = max(self._covered, saved - 1)  # the step just checkpointed logs as step - 1
            self.flush()

        def finalize(self, status: str = "success") -> None:
            if status == "failed":  # the run's own error is being raised: a store failing too is a warning
                self._pending = []
                try:
                    with tracking_errors(self._tracking_uri, "closing the stage run"):
                        super().finalize(status)
                except TrackingError as e:
                    log.warning("%s", e)
                return
            self.flush()
            with tracking_errors(self._tracking_uri, "closing the stage run"):
                super().finalize(status)

    return _Buffered


def BufferedMLFlowLogger(**kwargs: Any) -> Any:
    return _buffered_logger_class()(**kwargs)
