"""Tiny experiment runs shared by the end-to-end and notebook tests (each made once per session)."""

from __future__ import annotations

import contextlib
import copy
import json
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


# hand-over manifest path -> every weight of the model the stage handed over (LoRA merged), taken as it wrote
# the hand-over: what restoring the hand-over chain must give back (tests/test_handover_delta.py)
HANDED_OVER: dict[str, dict[str, torch.Tensor]] = {}


@contextlib.contextmanager
def recording_handovers():
    """While active, each hand-over the runner writes also records its model's full state in HANDED_OVER."""
    from pipeline import runner
    from pipeline.trainable import merge_lora

    save = runner.save_handover

    def save_and_record(model, path, **kwargs):
        written = save(model, path, **kwargs)
        merged = copy.deepcopy(model)  # the runner merges its LoRA adapters right after the hand-over
        merge_lora(merged)
        HANDED_OVER[str(written)] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        return written

    runner.save_handover = save_and_record
    try:
        yield
    finally:
        runner.save_handover = save


def tiny_server_overrides(tmp: Path, uri: str, *, experiment: str, instruct_epochs: int = 1) -> list[str]:
    """The demo at its smallest against a tracking server ``uri``; the model registered as ``<experiment>-demo``."""
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment_name={experiment}",
        f"mlflow.model_name={experiment}-demo",
        "mlflow.system_metrics=false",
        "data.datasets.phantom_captions.synthetic.train_images=16",
        "data.datasets.phantom_captions.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.train_images=16",
        "data.datasets.phantom_slake.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8",
        "stages.align.max_epochs=1",
        f"stages.instruct.max_epochs={instruct_epochs}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]


def run_tiny_demo(tmp: Path):
    """Run the tiny two-stage experiment once; snapshot each stage's weights as training starts."""
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(DEMO, tiny_demo_overrides(tmp))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(name: str, model: torch.nn.Module) -> None:
        snapshots[len(snapshots)] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    with recording_handovers():
        result = run_experiment(cfg, on_stage_start=snapshot)
    return cfg, result, snapshots, tmp


def tiny_conflict_overrides(tmp: Path) -> list[str]:
    """Stage 2 mixes captions (task caption) and VQA (task vqa) and logs their gradient conflict."""
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=conflict",
        "mlflow.system_metrics=false",
        "mlflow.register_model=false",
        "data.datasets.phantom_captions.task=caption",
        "data.datasets.phantom_captions.synthetic.train_images=16",
        "data.datasets.phantom_captions.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.train_images=8",
        "data.datasets.phantom_slake.synthetic.val_images=4",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8",
        "stages.align.max_steps=1",
        "stages.instruct.max_epochs=1",
        "stages.instruct.datasets=[phantom_captions,phantom_slake]",
        "evaluation.enabled=false",
        "analysis.grad_conflict.every_n_steps=2",
        "analysis.grad_conflict.samples_per_task=4",
        "analysis.grad_conflict.groups=[connector,lora]",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]


def run_tiny_conflict(tmp: Path):
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(DEMO, tiny_conflict_overrides(tmp))
    return cfg, run_experiment(cfg), tmp


MED_MOE_TINY = REPO / "experiments" / "med_moe" / "tiny.yaml"


def tiny_med_moe_overrides(tmp: Path, family: str) -> list[str]:
    """The Med-MoE chain (stage 1 -> stage 2 -> router -> stage 3 MoE) smaller still: 12 / 18 / 45 / 18
    steps, the load-balancing loss exercised (Med-MoE released 0). 24 SLAKE images is the floor for the
    router: with 16 the (untrained) tiny Phi's pooled features gave 0.46-0.75 validation accuracy."""
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=med-moe",
        "mlflow.system_metrics=false",
        "mlflow.register_model=false",
        f"model.llm.path=tiny:{family}",
        "data.datasets.phantom_captions.synthetic.train_images=32",
        "data.datasets.phantom_slake.synthetic.train_images=24",
        "data.datasets.phantom_slake.synthetic.questions_per_image=3",
        "data.datasets.phantom_slake.synthetic.val_images=8",
        "data.datasets.phantom_slake.synthetic.test_images=4",
        "data.batch_size=8",
        "stages.stage1.max_epochs=3",
        "stages.stage3.moe.aux_loss_coef=0.01",
    ]


def run_tiny_med_moe(tmp: Path, family: str = "llama"):
    """The tiny Med-MoE chain once, snapshotting each stage's weights as training starts (after the
    hand-over is restored and the MoE built): (cfg, result, {stage name: state dict}, tmp)."""
    from pipeline.config import load_config

    cfg = load_config(MED_MOE_TINY, tiny_med_moe_overrides(tmp, family))
    result, snapshots = run_with_snapshots(cfg)
    return cfg, result, snapshots, tmp


def run_with_snapshots(cfg):
    """Run an experiment on one thread, snapshotting each stage's weights as its training starts (after
    the hand-over is restored and any MoE built): (result, {stage name: state dict})."""
    from pipeline.runner import run_experiment

    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def snapshot(name: str, model: torch.nn.Module) -> None:
        snapshots[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    with recording_handovers():
        result = run_experiment(cfg, on_stage_start=snapshot)  # one thread: tiny.yaml's trainer.num_threads
    return result, snapshots


UNI_MED_TINY = REPO / "experiments" / "uni_med" / "tiny.yaml"
UNI_MED_FOLDERS = {
    "vqa": "phantom_slake",
    "refer": "phantom_slake",
    "identify": "phantom_slake",
    "caption": "phantom_reports",
    "cls": "phantom_cls",
    "qa": "phantom_qa",
}


def tiny_cmoe_overrides(tmp: Path, *, tracking_uri: str, experiment: str) -> list[str]:
    """Uni-Med's CMoE connector on its six tiny tasks, as short as still logs per-task routing: 2 epochs
    of 6 one-task batches, 2 validation images per task, no evaluation."""
    out = [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment_name={experiment}",
        "mlflow.register_model=false",
        "mlflow.system_metrics=false",
        "data.mixture.samples_per_epoch=48",
        "stages.uni_med.max_epochs=2",
        "evaluation.enabled=false",
    ]
    for name, folder in UNI_MED_FOLDERS.items():
        key = f"data.datasets.{name}"
        out += [
            f"{key}.path={tmp}/data/{folder}",
            f"{key}.synthetic.train_images=8",
            f"{key}.synthetic.val_images=2",
            f"{key}.synthetic.test_images=0",
        ]
    return out


def run_tiny_cmoe(tmp: Path, *, tracking_uri: str, experiment: str = "uni-med-cmoe"):
    """The tiny Uni-Med CMoE run into an existing tracking store: (cfg, result)."""
    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    cfg = load_config(UNI_MED_TINY, tiny_cmoe_overrides(tmp, tracking_uri=tracking_uri, experiment=experiment))
    with recording_handovers():
        return cfg, run_experiment(cfg)  # one thread: cpu_tiny.yaml's trainer.num_threads


MEDPLIB_TINY = REPO / "experiments" / "medplib" / "tiny.yaml"


def write_lesion_grounding(root: Path, *, n_train: int, n_test: int) -> dict[str, int]:
    """Synthetic MeCoVQA (release layout); the Grounding files keep the records that ask for a lesion."""
    from datamodules.writers import COMPLETE_MARKER
    from datamodules.writers.mecovqa import TEST_FILES, TRAIN_FILES, write_mecovqa

    write_mecovqa(root, n_train=n_train, n_test=n_test, seed=0, size=128)
    counts = {}
    for split, files in (("train", TRAIN_FILES), ("test", TEST_FILES)):
        path = root / files["grounding"]
        records = [r for r in json.loads(path.read_text()) if "segment the lesion" in r["conversations"][0]["value"]]
        path.write_text(json.dumps(records, indent=1))
        counts[split] = len(records)
    (root / COMPLETE_MARKER).write_text(json.dumps(counts) + "\n")  # written: ensure_synthetic leaves it
    return counts


def run_tiny_grounding(tmp: Path):
    """Stage III of the tiny MedPLIB recipe alone on lesion grounding (see tests/medplib/
    test_medplib_grounding_run.py): (cfg, result, counts of grounding records per split)."""
    from omegaconf import OmegaConf, open_dict

    from pipeline.config import load_config
    from pipeline.runner import run_experiment

    root = tmp / "mecovqa"
    counts = write_lesion_grounding(root, n_train=240, n_test=60)
    cfg = load_config(
        MEDPLIB_TINY,
        [
            f"output_dir={tmp}/out",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"data.datasets.mecovqa_grounding.path={root}",
            "data.batch_size=16",
            "stages.grounding_expert.max_epochs=48",
            # the released stage III starts from stage II, whose LM head and embeddings trained (<SEG>'s rows
            # included); this run skips stage II, so they train here, beside the FFN LoRA and the mask decoder
            "stages.grounding_expert.train=[lora,grounding,embeddings]",
            "stages.grounding_expert.optim.lr=3.0e-3",
            "evaluation.datasets=[mecovqa_grounding]",
            "evaluation.batch_size=32",
            "mlflow.system_metrics=false",
            "mlflow.register_model=false",
        ],
    )
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        for name in ("alignment", "language_expert", "moe"):
            del cfg.stages[name]
        del cfg.data.datasets["alignment"]
        del cfg.data.datasets["mecovqa_complex"]
        del cfg.data.datasets["mecovqa_region"]
        del cfg.data.datasets["public_vqa"]
    OmegaConf.set_readonly(cfg, True)
    return cfg, run_experiment(cfg), counts  # one thread: tiny.yaml's trainer.num_threads


def tiny_slake_experiment(tmp: Path, slake: Path, overrides: list[str] | None = None):
    """The smallest full run (issue 16 tests): one connector stage of one step on the SLAKE-layout folder
    ``slake``, then the final evaluation in its own run, registered; MLflow in ``tmp/mlflow.db``."""
    from pipeline.config import load_config

    exp = tmp / "tiny_slake.yaml"
    exp.write_text(
        f"""\
defaults: [{REPO / "experiments" / "defaults.yaml"}]
name: tiny-slake
output_dir: {tmp / "out"}
data:
  datasets:
    slake: {{format: slake, path: {slake}}}
  batch_size: 4
stages:
  train: {{train: [connector], max_steps: 1}}
evaluation: {{batch_size: 16, max_new_tokens: 2}}
trainer: {{num_threads: 1, enable_progress_bar: false, log_every_n_steps: 1}}
mlflow: {{tracking_uri: "sqlite:///{tmp / "mlflow.db"}", experiment_name: tiny-slake, system_metrics: false}}
"""
    )
    return exp, load_config(exp, list(overrides or []))


def full_state(cfg, handover: Path) -> dict[str, torch.Tensor]:
    """Every weight of the model a hand-over chain restores: built from ``cfg.model`` (the base checkpoints),
    then the chain's deltas (``pipeline.handover.restore``)."""
    from pipeline.handover import base_of, restore
    from pipeline.model_factory import build_model

    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    restore(model, handover, base=base_of(cfg.model))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
