"""Tiny experiment runs shared by the end-to-end and notebook tests (each made once per session)."""

from __future__ import annotations

from contextlib import contextmanager
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


def tiny_conflict_overrides(tmp: Path) -> list[str]:
    """Stage 2 mixes captions (task caption) and VQA (task vqa) and logs their gradient conflict."""
    return [
        f"output_dir={tmp}/out", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=conflict", "mlflow.system_metrics=false", "mlflow.register_model=false",
        "data.datasets.phantom_captions.task=caption",
        "data.datasets.phantom_captions.synthetic.train_images=16",
        "data.datasets.phantom_captions.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.train_images=8",
        "data.datasets.phantom_slake.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8", "stages.align.max_steps=1", "stages.instruct.max_epochs=1",
        "stages.instruct.datasets=[phantom_captions,phantom_slake]", "evaluation.enabled=false",
        "analysis.grad_conflict.every_n_steps=2", "analysis.grad_conflict.samples_per_task=4",
        "analysis.grad_conflict.groups=[connector,lora]",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    ]


def run_tiny_conflict(tmp: Path):
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(DEMO, tiny_conflict_overrides(tmp))
    return cfg, run_experiment(cfg), tmp


MED_MOE_TINY = REPO / "experiments" / "med_moe" / "tiny.yaml"


def tiny_med_moe_overrides(tmp: Path, family: str) -> list[str]:
    """The Med-MoE chain (stage 1 -> stage 2 -> router -> stage 3 MoE) smaller still: 4 / 6 / 6 / 6 steps
    per epoch, the load-balancing loss exercised (Med-MoE released 0)."""
    return [
        f"output_dir={tmp}/out", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.experiment_name=med-moe",
        "mlflow.system_metrics=false", "mlflow.register_model=false", f"model.llm.path=tiny:{family}",
        "data.datasets.phantom_captions.synthetic.train_images=32",
        "data.datasets.phantom_slake.synthetic.train_images=16",
        "data.datasets.phantom_slake.synthetic.questions_per_image=3",
        "data.datasets.phantom_slake.synthetic.val_images=8",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8", "stages.stage1.max_epochs=3", "stages.router.max_epochs=3",
        "stages.stage3.moe.aux_loss_coef=0.01",
    ]


@contextmanager
def torch_threads(count: int):
    """Tiny models: one intra-op thread. Their matmuls are too small to split, and on a machine whose
    cores are busy a second (spin-waiting) OpenMP thread makes each step 5-50x slower (measured on this
    project's 2-core runner: a tiny forward took 41 ms on 1 thread and 186-1962 ms on 2)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_tiny_med_moe(tmp: Path, family: str = "llama"):
    """The tiny Med-MoE chain once, snapshotting each stage's weights as training starts (after the
    hand-over is restored and the MoE built): (cfg, result, {stage name: state dict}, tmp)."""
    import pipeline.runner as runner

    from pipeline.config import load_config

    cfg = load_config(MED_MOE_TINY, tiny_med_moe_overrides(tmp, family))
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    original = runner.set_trainable
    names = list(cfg.stages.keys())

    def snapshot_then_set(model, groups):
        snapshots[names[len(snapshots)]] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(model, groups)

    runner.set_trainable = snapshot_then_set
    try:
        with torch_threads(1):
            result = runner.run_experiment(cfg)
    finally:
        runner.set_trainable = original
    return cfg, result, snapshots, tmp
