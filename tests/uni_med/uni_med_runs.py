"""Helpers for the CPU-tiny Uni-Med runs (experiments/uni_med/tiny.yaml and tiny/*.yaml, smaller still)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
UNI_MED = REPO / "experiments" / "uni_med"
TASK_DATASETS = ("vqa", "refer", "identify", "caption", "cls", "qa")


def tiny_overrides(tmp: Path, *, data_dir: Path, train_images: int = 24, test_images: int = 2) -> list[str]:
    """Smaller synthetic data (shared by every run of the session), quick MLflow."""
    folders = {
        "vqa": "phantom_slake",
        "refer": "phantom_slake",
        "identify": "phantom_slake",
        "caption": "phantom_reports",
        "cls": "phantom_cls",
        "qa": "phantom_qa",
    }
    out = [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=uni-med-tiny",
        "mlflow.register_model=false",
        "mlflow.system_metrics=false",
    ]
    for name in TASK_DATASETS:
        key = f"data.datasets.{name}"
        out += [
            f"{key}.path={data_dir}/{folders[name]}",
            f"{key}.synthetic.train_images={train_images}",
            f"{key}.synthetic.val_images=4",
            f"{key}.synthetic.test_images={test_images}",
        ]
    return out


@dataclass
class TinyRun:
    cfg: Any
    result: Any
    batch_tasks: list[int]  # task id of each training batch (one task per batch)
    losses: list[float]
    tmp: Path


def run_recording_tasks(cfg, tmp: Path) -> TinyRun:
    """run_experiment, with the loss history also keeping each training batch's task id."""
    from pipeline import runner

    tasks: list[int] = []
    histories = []

    class TaskLossHistory(runner.LossHistory):
        def __init__(self) -> None:
            super().__init__()
            histories.append(self)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            ids = batch["task_ids"].unique()
            tasks.append(int(ids[0]) if len(ids) == 1 else -1)

    original = runner.LossHistory
    runner.LossHistory = TaskLossHistory
    try:
        result = runner.run_experiment(cfg)
    finally:
        runner.LossHistory = original
    return TinyRun(cfg=cfg, result=result, batch_tasks=tasks, losses=histories[0].losses, tmp=tmp)
