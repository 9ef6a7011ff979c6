"""Issue 16, classes 4 and 8: faults mid-run end as one line, leave nothing half-written and nothing open.

- A stage whose trained weights are not finite fails naming the stage and the first bad parameter, exit 1
  through the CLI, and hands over, evaluates and registers nothing.
- A full disk while a hand-over is written: one line naming the file and "no space left on device", the
  temporary file removed (and an earlier hand-over kept).
- A process killed during the final evaluation leaves its MLflow run RUNNING: the resume closes it (KILLED).
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import tiny_slake_experiment

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def slake(tmp_path: Path) -> Path:
    from datamodules.writers.slake import write_slake

    write_slake(tmp_path / "slake", n_train=4, n_val=2, n_test=2, seed=3)
    return tmp_path / "slake"


def mlflow_runs(cfg) -> tuple[dict[str, list], object]:
    """The experiment's runs by name (a name may repeat: a killed and a resumed evaluation) and the client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        runs.setdefault(run.info.run_name, []).append(run)
    return runs, client


def statuses(runs: dict[str, list]) -> dict[str, list[str]]:
    return {name: sorted(r.info.status for r in found) for name, found in runs.items()}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("medpipe: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_non_finite_weights_fail_the_stage_and_register_nothing(
    tmp_path: Path, slake: Path, monkeypatch, capsys, tiny_llama, tiny_clip
) -> None:
    """The last optimiser step leaves NaN weights (its loss was finite): the stage must not hand them over."""
    from pipeline.cli import main

    exp, cfg = tiny_slake_experiment(tmp_path, slake)
    step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    assert main(["train", str(exp)]) == 1
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line.startswith("medpipe: error: stage train: trained weight connector."), line
    assert line.endswith(
        " is nan after training: nothing handed over or registered "
        "(lower stages.train.optim.lr, or set trainer.gradient_clip_val)"
    ), line
    stage_dir = Path(cfg.output_dir) / "stages" / "train"
    assert not list(stage_dir.glob("handover*")) and not (Path(cfg.output_dir) / "eval").exists()
    runs, client = mlflow_runs(cfg)
    assert client.search_registered_models() == []
    assert statuses(runs) == {"tiny-slake": ["FAILED"], "train": ["FAILED"]}  # nothing left RUNNING


class FullDisk:
    """A file that takes half of what is written, then fails as a full disk (or quota) does."""

    def __init__(self, path, mode, failure: OSError) -> None:
        self.file, self.failure = open(path, mode), failure  # noqa: SIM115 (closed in __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        raise self.failure


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")],
    ids=["enospc", "quota"],
)
def test_a_full_disk_during_the_hand_over_is_one_line_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch, failure: OSError
) -> None:
    from pipeline.cli import error_line
    from pipeline.handover import HandoverWriteError, load_handover, save_handover

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "stages" / "s" / "handover.json"
    save_handover(model, path, stage="s")  # an earlier, complete hand-over
    earlier = model.weight.detach().clone()
    monkeypatch.setattr("pipeline.handover.open", lambda p, mode: FullDisk(p, mode, failure), raising=False)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(HandoverWriteError) as info:
        save_handover(model, path, stage="s")
    message = str(info.value)
    delta = path.with_suffix(".safetensors")
    reason = failure.strerror.lower()
    assert message.startswith(f"{delta}: writing the hand-over failed: {reason} ("), message
    assert message.endswith("; the partial file was removed") and "\n" not in message
    assert error_line(info.value) == f"medpipe: error: {message}"
    assert sorted(p.name for p in path.parent.iterdir()) == ["handover.json", "handover.safetensors"]  # no temp
    monkeypatch.undo()
    kept = load_handover(path)["state_dict"]["weight"]
    assert torch.equal(kept, earlier)  # the earlier hand-over, intact (its hash still matches)


def test_a_full_disk_in_a_run_is_one_cli_line(tmp_path: Path, slake: Path, monkeypatch, capsys, tiny_llama, tiny_clip):
    from pipeline.cli import main

    exp, cfg = tiny_slake_experiment(tmp_path, slake)
    failure = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("pipeline.handover.open", lambda p, mode: FullDisk(p, mode, failure), raising=False)
    assert main(["train", str(exp), "trainer.save_checkpoints=false"]) == 1
    _, err = capsys.readouterr()
    delta = Path(cfg.output_dir) / "stages" / "train" / "handover.safetensors"
    assert one_error_line(err).startswith(
        f"medpipe: error: {delta}: writing the hand-over failed: no space left on device ("
    )
    assert not list(delta.parent.glob("handover*"))
    runs, _ = mlflow_runs(cfg)
    assert statuses(runs) == {"tiny-slake": ["FAILED"], "train": ["FAILED"]}


KILL_IN_EVALUATION = """\
import os, signal, sys
import pipeline.runner as runner
from pipeline.config import load_config

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

runner.evaluate_model = killed
runner.run_experiment(load_config(sys.argv[1], []))
"""


def test_resume_after_a_kill_in_the_final_evaluation_leaves_no_running_run(
    tmp_path: Path, slake: Path, tiny_llama, tiny_clip
) -> None:
    from pipeline.runner import run_experiment

    exp, cfg = tiny_slake_experiment(tmp_path, slake)
    done = subprocess.run(
        [sys.executable, "-c", KILL_IN_EVALUATION, str(exp)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,  # this checkout's packages; the environment (MEDPIPE_CACHE, CPU kernels) is inherited
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    runs, _ = mlflow_runs(cfg)
    assert statuses(runs) == {"tiny-slake": ["RUNNING"], "train": ["FINISHED"], "evaluate": ["RUNNING"]}
    state = json.loads((Path(cfg.output_dir) / "run_state.json").read_text())
    assert state["evaluation_run_id"] == runs["evaluate"][0].info.run_id

    _, resumed = tiny_slake_experiment(tmp_path, slake, ["resume=true"])
    result = run_experiment(resumed)
    assert result.evaluation is not None and result.evaluation.count == result.evaluation.n_expected > 0
    runs, _ = mlflow_runs(cfg)
    assert statuses(runs) == {"tiny-slake": ["FINISHED"], "train": ["FINISHED"], "evaluate": ["FINISHED", "KILLED"]}
    state = json.loads((Path(cfg.output_dir) / "run_state.json").read_text())
    assert state["evaluation_run_id"] is None and state["status"] == "finished"
