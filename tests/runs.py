"""Tiny experiment runs shared by the end-to-end and notebook tests (each made once per session)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"


def tiny_demo_overrides(tmp: Path) -> list[str]:
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=e2e",
        "data.datasets.phantom_captions.synthetic.train_images=48",
        "data.datasets.phantom_captions.synthetic.val_images=8",
        "data.datasets.phantom_slake.synthetic.train_images=48",
        "data.datasets.phantom_slake.synthetic.val_images=6",
        "data.datasets.phantom_slake.synthetic.test_images=6",
        "data.batch_size=8",
        "stages.align.max_epochs=6",
        "stages.instruct.max_epochs=4",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=5",
    ]


def run_tiny_demo(tmp: Path):
    """Run the tiny two-stage experiment once; snapshot each stage's weights as training starts."""
    import pipeline.runner as runner

    from pipeline.config import load_config

    cfg = load_config(DEMO, tiny_demo_overrides(tmp))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    original = runner.set_trainable

    def snapshot_then_set(model, groups):
        snapshots[len(snapshots)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(model, groups)

    runner.set_trainable = snapshot_then_set
    try:
        result = runner.run_experiment(cfg)
    finally:
        runner.set_trainable = original
    return cfg, result, snapshots, tmp
