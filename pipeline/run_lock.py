"""One running experiment per ``output_dir``: ``<output_dir>/.medpipe.lock``.

Two runs writing into one folder interleave hand-overs, checkpoints, ``run_state.json`` and evaluation
files without a trace. While a run (``medpipe train`` / ``demo`` / ``evaluate``) works in ``output_dir``,
its rank-0 process holds an exclusive ``fcntl.flock`` on the lock file, which records who holds it (pid,
host, start time, command). A second run into the same folder refuses at once with one line naming that
process (:class:`OutputDirLocked`, exit 1).

The kernel releases a ``flock`` when its holder exits, killed (SIGKILL, OOM) or not, so a lock never
outlives its process: a run that finds the lock file free but still naming another process (one that
died without cleaning up) takes it over and says so in the log. The file is emptied, never deleted, on a
clean exit: deleting it would let a third process lock a new file while a second still holds the old one.

Linux / POSIX only (``fcntl``); on a network filesystem ``flock`` works where the mount supports locks
(NFSv4 and Lustre with ``flock`` do). Only the global rank 0 locks: the other ranks of a distributed run
write into the same folder by design.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("medpipe")

LOCK_NAME = ".medpipe.lock"


class OutputDirLocked(RuntimeError):
    """Another running process holds ``output_dir``."""

    exit_code = 1


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 1234 on host h (medpipe train experiments/demo.yaml, started 2025-01-01 10:00:00)``."""
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    command = info.get("command") or "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} ({command}, started {when})"


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        return {"pid": "?", "host": "?", "command": "unreadable lock file"}
    return info if isinstance(info, dict) else {}


def _command_line() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    text = " ".join(args) or "python"
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path, *, enabled: bool | None = None) -> Iterator[Path | None]:
    """Hold ``output_dir``'s lock while the block runs; yields the lock file (None where not locking).

    ``enabled`` defaults to "this is the global rank 0". Refuses with :class:`OutputDirLocked` when a live
    process holds it; takes over (a log line) a lock file left by a process that is gone."""
    if enabled is None:
        from pipeline.tracking import is_rank_zero

        enabled = is_rank_zero()
    if not enabled:
        yield None
        return
    import fcntl

    directory = Path(output_dir)
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        from pipeline.config import ConfigError

        raise ConfigError(
            f"output_dir {directory} is not writable ({e.strerror or e}); checkpoints and hand-overs "
            "go there: set output_dir to a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_info(fd))
            raise OutputDirLocked(
                f"output_dir {directory} is in use by another run: {holder}; wait for it to end, stop it, "
                "or set output_dir to another folder"
            ) from None
        previous = _read_info(fd)
        if previous.get("pid") not in (None, os.getpid()) or previous.get("host") not in (None, socket.gethostname()):
            log.info(
                "output_dir %s: taking over the lock left by %s, which has ended", directory, describe_holder(previous)
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # a clean end: nothing to take over
    finally:
        os.close(fd)  # releases the lock
