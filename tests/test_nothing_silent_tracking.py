"""Issue 16, class 7: MLflow and concurrency. A fresh sqlite store opened by several processes at once (one
migrates, the others wait), one running experiment per output_dir, bounded HTTP retries, and every tracking
failure one ``medpipe: error:`` line (exit 2 for a wrong URI), never a traceback."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("medpipe: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def train(tmp: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["train", str(DEMO), f"output_dir={tmp}/out", *overrides])
    _, err = capsys.readouterr()
    return code, err


# --- wrong URIs: one line, exit 2, before anything is built --------------------------------------------------


def _uri_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "not-a-db.sqlite").write_text("name,value\na,1\n")
    (tmp / "a-folder.db").mkdir()
    return {
        "file://": (f"file://{tmp}/mlruns", "a path (MLflow's file store) is not supported"),
        "bare path": (f"{tmp}/mlruns", f"use a database, e.g. mlflow.tracking_uri=sqlite:///{tmp}/mlruns/mlflow.db"),
        "bare .db path": (f"{tmp}/mlflow.db", f"e.g. mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db,"),
        "ftp://": ("ftp://example.org/mlflow", "scheme 'ftp' is not a tracking store"),
        "s3://": ("s3://bucket/mlflow", "scheme 's3' is not a tracking store"),
        "not a database": (f"sqlite:///{tmp}/not-a-db.sqlite", "not-a-db.sqlite is not an SQLite database"),
        "a folder as database": (f"sqlite:///{tmp}/a-folder.db", "a-folder.db is a folder, not an SQLite database"),
    }


@pytest.mark.parametrize(
    "case", ["file://", "bare path", "bare .db path", "ftp://", "s3://", "not a database", "a folder as database"]
)
def test_a_wrong_tracking_uri_is_one_line_exit_two(case: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri, says = _uri_cases(tmp_path)[case]
    code, err = train(tmp_path, capsys, f"mlflow.tracking_uri={uri}")
    assert code == 2
    line = one_line(err)
    assert line.startswith("medpipe: error: mlflow.tracking_uri ") and says in line, line
    assert not (tmp_path / "out" / "stages").exists()


def test_the_file_store_is_mlflows_opt_in(tmp_path: Path, monkeypatch) -> None:
    """MLflow's own switch lets the folder store through (the data tests use it: no schema migration)."""
    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    tracker = Tracker(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment_name="file-store")
    assert tracker.start_child(run_name="r")


def test_http_bounds_are_config_keys_checked_at_load(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking import check_tracking_uri

    with pytest.raises(ConfigError, match="key 'mlflow.http_retries': must be >= 0, got -1"):
        load_config(DEMO, [f"output_dir={tmp_path}", "mlflow.http_retries=-1"], check_paths=False)
    cfg = load_config(DEMO, [f"output_dir={tmp_path}", "mlflow.http_retries=2"], check_paths=False)
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db", settings=cfg.mlflow)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(cfg.mlflow.http_timeout)
    assert os.environ["MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER"] == "false"


# --- HTTP servers that are not (or stop being) MLflow ---------------------------------------------------------


class FakeServer(BaseHTTPRequestHandler):
    """``mode="empty"``: ``{}`` to everything; ``mode="503"``: answers the reachability check as MLflow would,
    then 503 to every request."""

    mode = "503"
    requests: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        type(self).requests.append(f"{self.command} {self.path}")
        if self.mode == "empty":
            code, body = 200, b"{}"
        elif len(self.requests) == 1 and "experiments/search" in self.path:
            code, body = 200, b'{"experiments": []}'
        elif len(self.requests) == 2 and "experiments/get-by-name" in self.path:
            code, body = 404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such experiment"}'
        else:
            code, body = 503, b"Service Unavailable"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = _answer


@pytest.fixture
def fake_server(request) -> Iterator[tuple[str, list[str]]]:
    handler = type("Handler", (FakeServer,), {"mode": request.param, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("fake_server", ["503"], indirect=True)
def test_a_server_answering_503_after_the_check_fails_in_bounded_time(
    fake_server, tmp_path: Path, capsys, tiny_llama, tiny_clip
) -> None:
    uri, requests = fake_server
    start = time.perf_counter()
    code, err = train(tmp_path, capsys, f"mlflow.tracking_uri={uri}")
    elapsed = time.perf_counter() - start
    assert code == 1
    line = one_line(err)
    assert line.startswith(f"medpipe: error: MLflow tracking store {uri}: ")
    assert "the server answered HTTP 503 to 4 tries (mlflow.http_retries)" in line
    assert len(requests) == 2 + 4  # the check, then one request tried 1 + 3 times
    assert elapsed < 30, elapsed  # MLflow's defaults: over 4 minutes
    assert not (tmp_path / "out" / "stages").exists()


@pytest.mark.parametrize("fake_server", ["empty"], indirect=True)
def test_a_server_answering_empty_objects_is_not_mlflow(fake_server, tmp_path: Path, capsys) -> None:
    uri, _ = fake_server
    start = time.perf_counter()
    code, err = train(tmp_path, capsys, f"mlflow.tracking_uri={uri}")
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"medpipe: error: {uri} does not answer like an MLflow tracking server: ")
    assert "answered HTTP 200 {}" in line
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("fake_server", ["empty"], indirect=True)
def test_tracker_calls_fail_in_one_line_past_the_check(fake_server, monkeypatch) -> None:
    """Without the check (a Tracker made directly), the first call the answer does not fit is one line."""
    from pipeline.tracking import Tracker, TrackingError

    uri, _ = fake_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(tracking_uri=uri, experiment_name="x")
    with pytest.raises(TrackingError, match=f"^MLflow tracking store {uri}: .* failed: ") as info:
        from omegaconf import OmegaConf

        tracker.start_parent(run_name="r", cfg=OmegaConf.create({"a": 1}), tags={})
    assert "\n" not in str(info.value)


# --- a fresh sqlite store opened by several processes at once -------------------------------------------------


def _open_and_log(uri: str, barrier, results) -> None:
    from omegaconf import OmegaConf

    from pipeline.tracking import Tracker

    barrier.wait()  # every process past its imports: the stores are opened at the same moment
    try:
        tracker = Tracker(tracking_uri=uri, experiment_name="race")
        run = tracker.start_parent(run_name=f"run-{os.getpid()}", cfg=OmegaConf.create({"a": 1}), tags={})
        tracker.register_model(run, name="race-model", files={})
        tracker.finish(run)
        results.put("ok")
    except BaseException as e:  # reported to the test, which shows it
        results.put(f"{type(e).__name__}: {e}")


def test_a_fresh_sqlite_store_opened_by_three_processes_at_once(tmp_path: Path) -> None:
    """Without the store lock, 3 of 3 trials had processes die in alembic's migration ("table
    _alembic_tmp_metrics already exists", "duplicate column name: step")."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    processes = [context.Process(target=_open_and_log, args=(uri, barrier, results)) for _ in range(3)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["ok", "ok", "ok"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("race")
    assert len(client.search_runs([experiment.experiment_id])) == 3
    assert len(client.search_model_versions("name='race-model'")) == 3


def test_the_second_process_waits_for_the_store_lock(tmp_path: Path) -> None:
    """While one process holds the lock (creating the store), another opening the same store waits."""
    from pipeline.tracking import store_init_lock

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = "import sys; from pipeline.tracking import open_client; open_client(sys.argv[1]); print('opened')"
    with store_init_lock(uri):
        child = subprocess.Popen(
            [sys.executable, "-c", script, uri], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(8)  # enough for the child to import MLflow and reach the lock
        assert child.poll() is None  # still waiting
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == "opened"
    assert (tmp_path / "mlflow.db.lock").exists()


# --- a store on a full disk ----------------------------------------------------------------------------------

FULL_DISK = """
import os, resource, signal, sys
from omegaconf import OmegaConf
from pipeline.tracking import Tracker, TrackingError
uri = sys.argv[1]
tracker = Tracker(tracking_uri=uri, experiment_name="full")
run = tracker.start_parent(run_name="r", cfg=OmegaConf.create({"a": 1}), tags={})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
size = os.path.getsize(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))  # the database cannot grow: a full disk for it
try:
    for i in range(100):
        tracker.log_params(run, {f"p{i}.{j}": "x" * 500 for j in range(100)})
except TrackingError as e:
    print(e)
    tracker.finish(run, "FAILED")  # closing a failed run on a broken store: a warning, not a second error
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE stands for a full disk on Linux")
def test_a_store_on_a_full_disk_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, f"sqlite:///{db}", str(db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f"MLflow tracking store sqlite:///{db}: logging params failed: (sqlite3.")
    assert "MiB free on" in lines[0]
    assert "Traceback" not in done.stderr


# --- one running experiment per output_dir -------------------------------------------------------------------

HOLD = """
import sys
from pipeline.run_lock import output_dir_lock
with output_dir_lock(sys.argv[1], enabled=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_into_a_locked_output_dir_refuses_naming_the_holder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = train(tmp_path, capsys, f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db")
        assert code == 1
        line = one_line(err)
        assert line.startswith(f"medpipe: error: output_dir {out} is in use by another run: pid {holder.pid} on host ")
        assert socket.gethostname() in line and "or set output_dir to another folder" in line
        assert not (tmp_path / "mlflow.db").exists()  # refused before anything else

        # evaluate writes into output_dir/eval: refused too
        ckpt = tmp_path / "x.pt"
        _write_handover(ckpt)
        code = main(["evaluate", str(DEMO), f"ckpt={ckpt}", f"output_dir={out}",
                     f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])  # fmt: skip
        assert code == 1
        assert f"pid {holder.pid}" in one_line(capsys.readouterr().err)
    finally:
        holder.kill()  # SIGKILL: the lock file still names it
        holder.wait()
    assert json.loads((out / ".medpipe.lock").read_text())["pid"] == holder.pid


def _write_handover(path: Path) -> None:
    import torch

    torch.save({"format": 1, "stage": "s", "meta": {"structure": []}, "state_dict": {"w": torch.zeros(1)}}, path)


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_log_line(tmp_path: Path) -> None:
    import logging

    from pipeline.run_lock import LOCK_NAME, output_dir_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("medpipe")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        with output_dir_lock(tmp_path, enabled=True) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
            with pytest.raises(Exception, match=f"in use by another run: pid {os.getpid()} "):
                with output_dir_lock(tmp_path, enabled=True):  # a second holder, even in this process
                    pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any(
        f"taking over the lock left by pid {holder.pid} on host " in r and "which has ended" in r for r in records
    )
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean end leaves nothing to take over


def test_only_rank_zero_locks(tmp_path: Path) -> None:
    from pipeline.run_lock import output_dir_lock

    with output_dir_lock(tmp_path, enabled=True), output_dir_lock(tmp_path, enabled=False) as other:
        assert other is None  # the other ranks of a distributed run share the folder by design


def test_evaluate_an_unknown_registered_model_is_one_line(tmp_path: Path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(
        ["evaluate", str(DEMO), "ckpt=models:/nobody/1", f"output_dir={tmp_path}/out", f"mlflow.tracking_uri={uri}"]
    )
    assert code == 1
    assert one_line(capsys.readouterr().err) == (
        f"medpipe: error: MLflow tracking store {uri}: downloading models:/nobody/1 failed: "
        "Registered Model with name=nobody not found"
    )


TINY_TRAIN = [
    "data.datasets.phantom_captions.synthetic.train_images=8",
    "data.datasets.phantom_captions.synthetic.val_images=2",
    "data.datasets.phantom_slake.synthetic.train_images=8",
    "data.datasets.phantom_slake.synthetic.val_images=2",
    "data.datasets.phantom_slake.synthetic.test_images=2",
    "stages.align.max_epochs=1",
    "stages.instruct.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "mlflow.system_metrics=false",
]


@pytest.mark.slow
def test_two_trainings_started_at_once_on_a_fresh_sqlite_store_both_finish(
    tmp_path: Path, tiny_llama, tiny_clip
) -> None:
    """Two ``medpipe train`` processes, one fresh sqlite store, two output_dirs: both finish and register."""
    from mlflow.tracking import MlflowClient

    medpipe = Path(sys.executable).parent / "medpipe"
    uri = f"sqlite:///{tmp_path}/shared/mlflow.db"
    env = {k: v for k, v in os.environ.items() if k != "MEDPIPE_TRACEBACK"}
    runs = [
        subprocess.Popen(
            [
                str(medpipe),
                "train",
                str(DEMO),
                f"output_dir={tmp_path}/out{i}",
                f"mlflow.tracking_uri={uri}",
                *TINY_TRAIN,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, done, strict=True):
        assert run.returncode == 0, err
        assert "Traceback" not in err
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medpipe-demo")
    parents = client.search_runs([experiment.experiment_id], "tags.recipe = 'demo'")
    assert sorted(r.info.status for r in parents if "mlflow.parentRunId" not in r.data.tags) == ["FINISHED"] * 2
    assert len(client.search_model_versions("name='medpipe-demo'")) == 2
