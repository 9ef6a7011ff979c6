"""Fault tolerance: a SIGKILLed run resumed with resume=true ends exactly where an uninterrupted run
ends (weights, evaluation, MLflow history); NaN stop; unwritable output directory; resume errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
MEDPIPE = [sys.executable, "-m", "pipeline.cli"]

SMALL = [
    "data.datasets.phantom_captions.synthetic.train_images=16",
    "data.datasets.phantom_captions.synthetic.val_images=4",
    "data.datasets.phantom_slake.synthetic.train_images=16",
    "data.datasets.phantom_slake.synthetic.val_images=4",
    "data.datasets.phantom_slake.synthetic.test_images=4",
    "data.batch_size=8",
    "stages.align.max_epochs=2",
    "stages.instruct.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.checkpoint_every_n_steps=3",
    "evaluation.after_each_stage=false",
    "mlflow.experiment_name=resume",
    "mlflow.system_metrics=false",
]


def overrides(tmp: Path, name: str) -> list[str]:
    return [f"output_dir={tmp / name}", f"mlflow.tracking_uri=sqlite:///{tmp / name}.db", *SMALL]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False, **kwargs)


def history(db: Path) -> dict[str, dict]:
    """Per run name: status, run id and the train/loss history as (step, value) sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("resume")
    out = {}
    for r in client.search_runs([experiment.experiment_id]):
        assert r.info.run_name not in out, f"two runs named {r.info.run_name}: resume must reuse the run"
        points = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss"))
        out[r.info.run_name] = {"status": r.info.status, "id": r.info.run_id, "loss": points, "metrics": r.data.metrics}
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path, tiny_llama, tiny_clip) -> None:
    reference = run([*MEDPIPE, "train", str(DEMO), *overrides(tmp_path, "ref")])
    assert reference.returncode == 0, reference.stderr[-3000:]

    # killed after optimiser step 5 of stage 2 (mid-epoch: 10 batches per epoch); last.ckpt is from step 3
    killed = run(
        [
            sys.executable,
            str(REPO / "tests" / "scaling" / "kill_at_step.py"),
            "instruct",
            "5",
            str(DEMO),
            *overrides(tmp_path, "crash"),
        ]
    )
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    state = json.loads((tmp_path / "crash" / "run_state.json").read_text())
    assert state["stages"]["align"]["status"] == "done" and state["stages"]["instruct"]["status"] == "running"
    ckpt = torch.load(tmp_path / "crash" / "stages" / "instruct" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    before = history(tmp_path / "crash.db")
    assert [s for s, _ in before["instruct"]["loss"]] == [0, 1, 2]  # only what the checkpoint covers

    resumed = run([*MEDPIPE, "train", str(DEMO), *overrides(tmp_path, "crash"), "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage align: finished before the resume" in resumed.stderr

    from pipeline.handover import load_handover

    # the instruct stage's deltas (the same trained keys: connector and LoRA-merged weights)
    ref_w = load_handover(tmp_path / "ref" / "stages" / "instruct" / "handover.json")["state_dict"]
    res_w = load_handover(tmp_path / "crash" / "stages" / "instruct" / "handover.json")["state_dict"]
    assert any(k.startswith("connector.") for k in ref_w)
    assert ref_w.keys() == res_w.keys()
    for key in ref_w:
        torch.testing.assert_close(res_w[key], ref_w[key], rtol=0, atol=1e-6, msg=key)

    ref, res = history(tmp_path / "ref.db"), history(tmp_path / "crash.db")
    assert res["demo"]["id"] == before["demo"]["id"] and res["instruct"]["id"] == before["instruct"]["id"]
    assert all(r["status"] == "FINISHED" for r in res.values())
    for stage in ("align", "instruct"):
        steps = [s for s, _ in res[stage]["loss"]]
        assert steps == sorted(set(steps)), f"duplicated steps in {stage}"
        assert steps == [s for s, _ in ref[stage]["loss"]] == list(range(len(steps))), f"missing steps in {stage}"
        torch.testing.assert_close(
            torch.tensor([v for _, v in res[stage]["loss"]]),
            torch.tensor([v for _, v in ref[stage]["loss"]]),
            rtol=0,
            atol=1e-5,
        )
    evaluation = {k: v for k, v in ref["evaluate"]["metrics"].items() if k.startswith("eval/")}
    assert evaluation and {k: res["evaluate"]["metrics"][k] for k in evaluation} == evaluation


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path: Path) -> None:
    result = run([*MEDPIPE, "train", str(DEMO), *overrides(tmp_path, "none"), "resume=true"])
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "run_state.json does not exist" in last and "resume=true" in last


def test_unwritable_output_dir_fails_before_building(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run(
        [*MEDPIPE, "train", str(DEMO), f"output_dir={blocker}/out", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "is not writable" in last and str(blocker) in last


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, tiny_llama, tiny_clip, monkeypatch) -> None:
    from lightningmodules.models.multimodal import MultimodalLM
    from lightningmodules.vlm_module import NonFiniteLossError
    from pipeline import runner
    from pipeline.config import load_config

    forward = MultimodalLM.forward
    calls = {"train": 0}

    def nan_at_step_5(model, *args, **kwargs):  # the 6th training forward (global step 5) returns NaN
        out = forward(model, *args, **kwargs)
        if model.training:
            if calls["train"] == 5:
                out.loss = out.loss * float("nan")
            calls["train"] += 1
        return out

    monkeypatch.setattr(MultimodalLM, "forward", nan_at_step_5)
    cfg = load_config(DEMO, [*overrides(tmp_path, "nan"), "stages.align.max_epochs=4"])
    with pytest.raises(NonFiniteLossError) as error:
        runner.run_experiment(cfg)
    message = str(error.value)
    last = tmp_path / "nan" / "stages" / "align" / "checkpoints" / "last.ckpt"
    assert "stage align" in message and "step 5" in message and str(last) in message
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the last good one, not overwritten
    state = json.loads((tmp_path / "nan" / "run_state.json").read_text())
    assert state["stages"]["align"]["status"] == "running" and "instruct" not in state["stages"]
