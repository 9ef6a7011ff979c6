"""``<output_dir>/run_state.json``: which MLflow runs an experiment made and how far each stage got.

``resume=true`` reads it to continue the same parent and stage runs: finished stages are skipped
(their hand-overs are on disk), the running stage restarts from its ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

FILE = "run_state.json"
VERSION = 1


@dataclass
class StageState:
    status: str = "running"  # running | done
    run_id: str | None = None
    handover: str | None = None
    losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunState:
    name: str
    parent_run_id: str | None = None
    status: str = "running"  # running | finished
    stages: dict[str, StageState] = field(default_factory=dict)
    # the final evaluation's MLflow run while it is open: set when it starts, cleared when it ends; a resume that
    # finds it set closes it as KILLED (the process stopped mid-evaluation) and evaluates in a new run
    evaluation_run_id: str | None = None
    version: int = VERSION

    def stage(self, name: str) -> StageState:
        return self.stages.setdefault(name, StageState())


def state_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / FILE


def load_run_state(out_dir: str | Path) -> RunState | None:
    path = state_path(out_dir)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        stages = {name: StageState(**s) for name, s in raw.pop("stages", {}).items()}
        return RunState(**raw, stages=stages)
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: not a medpipe run state ({e}); remove it or choose another output_dir") from None


def save_run_state(state: RunState, out_dir: str | Path, *, is_writer: bool = True) -> None:
    """Atomic write (rank 0 only: every rank reads the same file on a resume)."""
    if not is_writer:
        return
    path = state_path(out_dir)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    tmp.replace(path)


def state_for_resume(out_dir: str | Path, experiment: str) -> RunState:
    """The state ``resume=true`` continues; a clear error when there is nothing to continue."""
    state = load_run_state(out_dir)
    if state is None:
        raise ConfigError(
            f"resume=true but {state_path(out_dir)} does not exist: no run to continue in "
            f"output_dir {out_dir} (start without resume=true)"
        )
    if state.name != experiment:
        raise ConfigError(
            f"resume=true: {state_path(out_dir)} belongs to experiment {state.name!r}, not {experiment!r}"
        )
    if state.status == "finished":
        raise ConfigError(
            f"resume=true: the run in {out_dir} already finished (MLflow run {state.parent_run_id}); "
            "nothing to continue"
        )
    return state


def describe(state: RunState) -> dict[str, Any]:
    return {name: s.status for name, s in state.stages.items()}
