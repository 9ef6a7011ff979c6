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


GIT_TIMEOUT = 5.0  # seconds per git call: a slow network filesystem never holds up a run


def _git(directory: Path, *args: str) -> str | None:
    """``git -C directory args`` stdout, stripped; None when git is missing, fails or is slow."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_checkout(directory: Path, *, root: bool = False) -> dict[str, str]:
    """``{"commit", "dirty"}`` of the git checkout holding ``directory`` (``root``: only when ``directory`` is
    that checkout's top folder); empty when it is none, or git is missing."""
    top = _git(directory, "rev-parse", "--show-toplevel")
    if not top or (root and Path(top).resolve() != directory.resolve()):
        return {}
    commit = _git(directory, "rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, **({"dirty": str(bool(status)).lower()} if status is not None else {})}


def medpipe_source_dir() -> Path:
    """The folder holding medpipe's packages (``pipeline/`` ...): a checkout's root for an editable install."""
    return Path(__file__).resolve().parent.parent


def version_tags(cwd: Path | None = None) -> dict[str, str]:
    """What code ran: ``medpipe.version`` (the installed distribution's), ``medpipe.commit`` / ``medpipe.dirty``
    when medpipe runs from a git checkout (its own, not one it happens to be installed inside), and
    ``cwd.git_commit`` / ``cwd.git_dirty`` of the working directory when that is a git checkout (the user's
    configs and data scripts). Each git call is bounded by :data:`GIT_TIMEOUT`; none fails the run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tags = {"medpipe.version": version("medpipe")}
    except PackageNotFoundError:
        tags = {"medpipe.version": "unknown (not installed)"}
    tags.update({f"medpipe.{k}": v for k, v in git_checkout(medpipe_source_dir(), root=True).items()})
    tags.update({f"cwd.git_{k}": v for k, v in git_checkout(cwd or Path.cwd()).items()})
    return tags


# MLflow's experiment kind: "custom_model_development" is the UI's "Machine learning" kind (runs, metrics,
# models), "genai_development" its GenAI one (traces). MLflow 3.17's UI reads the tag only where its global
# GenAI / Model training switch is off; with the switch (the default) the view follows the switch or the
# URL's ?workflowType=machine_learning, which runs_page_url adds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ARTIFACTS_FOLDER = "mlartifacts"
# the headline metrics of an evaluation (pipeline/evaluation.py logs them; the experiment run repeats the final
# evaluation's), as a registered version's description names them
HEADLINE_LABELS = {"eval/closed_accuracy": "closed accuracy", "eval/open_recall": "open recall", "eval/bleu1": "BLEU-1"}
BASELINE_KEYS = ("baseline/closed_accuracy", "baseline/open_recall")


def artifact_location(uri: str, experiment_name: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its runs' artifacts: beside the database,
    ``<folder of mlflow.db>/mlartifacts/<experiment name>`` (absolute), whatever folder the command ran
    from (MLflow's default is ``./mlruns`` of the working directory). None for other stores: a tracking
    server or a remote database decides itself."""
    path = sqlite_path(uri)
    if path is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name).strip("._") or "experiment"
    return str(path.expanduser().resolve().parent / ARTIFACTS_FOLDER / slug)


def runs_page_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs, in the model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


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


# keys logged as parent params whatever their value: what a reader needs to tell recipes apart
RECIPE_KEYS = (
    "name",
    "seed",
    "model.vision.path",
    "model.llm.path",
    "model.connector.type",
    "evaluation.split",
    "stages.*.kind",
    "stages.*.train",
    "stages.*.datasets",
    "data.datasets.*.format",
)


def _schema_default(node: DictConfig) -> DictConfig | None:
    """The schema's defaults of a structured section (a ``StageConfig`` entry: ``StageConfig()``)."""
    import dataclasses

    kind = OmegaConf.get_type(node)
    if kind is not None and dataclasses.is_dataclass(kind):
        return OmegaConf.structured(kind)
    return None


def non_default_keys(cfg: DictConfig) -> set[str]:
    """Dotted leaf keys whose resolved value differs from the schema's default (entries of open sections,
    ``stages.<name>`` and ``data.datasets.<name>``, against their section type's defaults)."""
    found: set[str] = set()

    def plain(value: Any) -> Any:
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    def walk(node: DictConfig, default: DictConfig | None, prefix: str) -> None:
        for key in node.keys():
            child = node._get_node(key)
            base = default._get_node(key) if default is not None and key in default else None
            if isinstance(child, DictConfig) and not child._is_none():
                if not isinstance(base, DictConfig) or base._is_none():
                    base = _schema_default(child)
                walk(child, base, f"{prefix}{key}.")
            elif base is None or plain(node[key]) != plain(default[key]):
                found.add(f"{prefix}{key}")

    walk(cfg, _schema_default(cfg), "")
    return found


def recipe_params(cfg: DictConfig) -> dict[str, str]:
    """The parent run's params: values that differ from the schema's defaults plus :data:`RECIPE_KEYS`
    (models, connector, stage kinds / trained groups / datasets, dataset formats, evaluation split). The
    full resolved config is the run's ``config.yaml`` artifact."""
    flat = flatten_config(cfg)
    wanted = non_default_keys(cfg)
    patterns = [re.compile(re.escape(k).replace(r"\*", r"[^.]+") + "$") for k in RECIPE_KEYS]
    return {k: v for k, v in flat.items() if k in wanted or any(p.match(k) for p in patterns)}


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
        """The experiment's id, created when missing: kind "model training" (:data:`EXPERIMENT_KIND`, also set
        on an existing experiment without one) and, for a local sqlite store, its artifacts beside the database
        (:func:`artifact_location`)."""
        if self.experiment_id is None:
            with self._guard(f"finding experiment {self.experiment_name!r}"):
                found = self.client.get_experiment_by_name(self.experiment_name)
                if found is None:
                    self.experiment_id = self.client.create_experiment(
                        self.experiment_name,
                        artifact_location=artifact_location(self.tracking_uri, self.experiment_name),
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                    )
                else:
                    self.experiment_id = found.experiment_id
                    if EXPERIMENT_KIND_TAG not in found.tags:
                        self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return self.experiment_id

    def runs_page(self) -> str:
        """Where a user sees this experiment's runs: the MLflow UI page (an http server's own address; for a
        database, ``mlflow ui``'s default address, with the command that serves it)."""
        if uri_scheme(self.tracking_uri) in ("http", "https"):
            return runs_page_url(self.tracking_uri, self._experiment())
        page = runs_page_url("http://127.0.0.1:5000", self._experiment())
        return f"{page} after `mlflow ui --backend-store-uri {self.tracking_uri}`"

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
        """The recipe's params (:func:`recipe_params`) and the full resolved config as ``config.yaml``."""
        self.log_params(run_id, recipe_params(cfg))
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

    def log_datasets(self, run_id: str | None, inputs: list[Any]) -> None:
        """MLflow dataset inputs of ``run_id`` (``mlflow.entities.DatasetInput``, see ``pipeline.mlflow_inputs``):
        the runs table's Dataset column. MLflow keeps the first input of a (name, digest) per run."""
        if not self.enabled or run_id is None or not inputs:
            return
        with self._guard("logging dataset inputs"):
            self.client.log_inputs(run_id, datasets=inputs)

    def child_runs(self, run_id: str) -> list[Any]:
        """The runs nested under ``run_id`` (stages, evaluation), oldest first."""
        with self._guard(f"reading the runs of {run_id}"):
            run = self.client.get_run(run_id)
            return self.client.search_runs(
                [run.info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                order_by=["attributes.start_time ASC"],
            )

    def log_child_datasets(self, run_id: str | None) -> None:
        """Every dataset input of the runs nested under ``run_id`` as an input of ``run_id`` too, its context the
        splits over all of them ("train+val+test"): the experiment run's row in the runs table names its data."""
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import DatasetInput, InputTag

        from_children: dict[tuple[str, str], Any] = {}
        splits: dict[tuple[str, str], list[str]] = {}
        for child in self.child_runs(run_id):
            for given in child.inputs.dataset_inputs if child.inputs else []:
                key = (given.dataset.name, given.dataset.digest)
                from_children.setdefault(key, given.dataset)
                for tag in given.tags:
                    if tag.key == "mlflow.data.context":
                        found = splits.setdefault(key, [])
                        found += [s for s in tag.value.split("+") if s and s not in found]
        order = ("train", "val", "test")
        inputs = [
            DatasetInput(
                dataset=dataset,
                tags=[
                    InputTag(
                        "mlflow.data.context",
                        "+".join(sorted(splits.get(key, []), key=lambda s: order.index(s) if s in order else 3)),
                    )
                ],
            )
            for key, dataset in from_children.items()
        ]
        self.log_datasets(run_id, inputs)

    def model_card(self, run_id: str) -> tuple[str, dict[str, str]]:
        """A registered version's description and tags, from the experiment run: its recipe, its stage runs in
        order, the final evaluation's headline metrics logged on it and the code's version tags."""
        with self._guard(f"reading run {run_id}"):
            run = self.client.get_run(run_id)
        children = self.child_runs(run_id)
        stages = [c.info.run_name for c in children if c.data.tags.get("stage") != "evaluate"]
        recipe = run.data.tags.get("recipe") or run.info.run_name
        metrics = run.data.metrics
        scores = [f"{label} {metrics[key]:.3f}" for key, label in HEADLINE_LABELS.items() if key in metrics]
        baseline = [f"{metrics[key]:.3f}" for key in BASELINE_KEYS if key in metrics]
        lines = [f"medpipe recipe `{recipe}`, stages {' -> '.join(stages) or '-'} (run {run_id})."]
        if scores:
            split = run.data.params.get("evaluation.split") or run.data.tags.get("evaluation.split") or "test"
            lines.append(
                f"Final evaluation ({split} split): {', '.join(scores)}"
                + (f" (majority-answer baseline {' / '.join(baseline)})." if baseline else ".")
            )
        lines.append(
            "Load: mlflow.pyfunc.load_model(uri).predict(DataFrame with columns image (path) and question) -> "
            "answers, or pipeline.registry.load_registered(uri, tracking_uri=...) for the model itself."
        )
        tags = {"recipe": recipe, "stages": ",".join(stages), "source_run": run_id}
        for key in ("medpipe.version", "medpipe.commit", "cwd.git_commit"):
            if key in run.data.tags:
                tags[key] = run.data.tags[key]
        tags.update({key: f"{metrics[key]:.4f}" for key in HEADLINE_LABELS if key in metrics})
        return "\n".join(lines), tags

    def _record_model(self, run_id: str, mlmodel: Path) -> None:
        """The run's ``mlflow.log-model.history`` tag, as ``mlflow.<flavour>.log_model`` writes it: the runs table's
        Models column and the run page then name ``model/``. Best effort (MLflow's private client call): a failure
        is a warning, the registration goes on."""
        from mlflow.models import Model

        try:
            model = Model.load(str(mlmodel))
            model.run_id, model.artifact_path = run_id, "model"
            self.client._record_logged_model(run_id, model)
        except Exception as e:
            log.warning("MLflow: model/ not recorded in run %s's logged models: %s", run_id, failure_reason(e))

    def register_model(
        self,
        run_id: str | None,
        *,
        name: str,
        files: dict[str, Path],
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Log ``files`` under ``model/`` of the run and register them as a new version of ``name``.

        ``files``: path under ``model/`` (``config.yaml``, ``handover.json``, ``previous/...``) -> local file.
        ``model/`` is also an MLflow pyfunc model (``MLmodel`` with a signature, ``pipeline.mlflow_model``):
        ``mlflow.pyfunc.load_model(uri)`` answers questions on images. The version gets ``description`` and
        ``tags`` (default: :meth:`model_card`, from the run). Returns the ``models:/name/version`` URI;
        :func:`pipeline.registry.load_registered` loads it too.
        """
        if not self.enabled or run_id is None:
            return None
        import tempfile

        from mlflow.exceptions import MlflowException

        from pipeline.mlflow_model import write_pyfunc_files

        card_description, card_tags = self.model_card(run_id)
        description = card_description if description is None else description
        tags = {**card_tags, **(tags or {})}
        with self._guard(f"registering model {name!r}"), tempfile.TemporaryDirectory(prefix="medpipe-model-") as tmp:
            for key, path in files.items():  # key: the file's path under model/
                folder, _, file_name = key.rpartition("/")
                source = Path(path)
                if source.name != file_name:  # log_artifact keeps the file's own name: log a copy named as the key
                    source = Path(tmp) / "renamed" / key
                    source.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, source)
                self.client.log_artifact(run_id, str(source), f"model/{folder}" if folder else "model")
            flavour = write_pyfunc_files(Path(tmp) / "pyfunc", metadata={"medpipe.recipe": tags.get("recipe", "")})
            self.client.log_artifacts(run_id, str(flavour), "model")
            self._record_model(run_id, flavour / "MLmodel")
            try:
                self.client.create_registered_model(
                    name, description="medpipe models: each version is one experiment run's final model"
                )
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # already registered: add a version
            # the source is the run's model folder as its artifact URI, not runs:/<id>/model: a tracking server
            # serves a version's files (the MLflow UI's schema, downloads) only from the former
            source = self.client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model"
            version = self.client.create_model_version(
                name, source=source, run_id=run_id, tags=tags, description=description
            )
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
