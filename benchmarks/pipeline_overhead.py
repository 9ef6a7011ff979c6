"""Training-loop time of medpipe's real stage path against a plain PyTorch loop doing the same work.

``medpipe``: ``pipeline.runner.run_stage`` on the demo's ``instruct`` stage (tiny CLIP + tiny Llama, LoRA +
connector training), unchanged: the runner's callbacks (``LossHistory``, ``StageCheckpoint`` every
``--checkpoint-every`` steps with ``DataPosition`` and ``RngState``), the buffered MLflow logger on a sqlite
store, validation at every epoch end, ``log_every_n_steps``, gradient clipping, the stage's AdamW + schedule.
The benchmark adds one callback (``extra_callbacks``) that reads the clock; the progress bar and MLflow's
system-metrics sampler are off (config keys), evaluation is off (not part of the loop).

``plain``: a hand-written loop over the same model (``build_model`` + the stage's LoRA and trainable groups),
the same DataModule loaders (MixtureSampler, collator, ``set_epoch``), the same optimiser and schedule
(``build_optimizer``) and clipping; it records every step's loss (``loss.item()``: the loss history and the
non-finite check), logs ``train/loss`` and ``epoch`` every ``log_every_n_steps`` and ``val/loss`` after each
validation to the same MLflow store through ``MlflowClient.log_batch``, validates on the same batches under
``torch.inference_mode`` at each epoch end, and writes a checkpoint (model, optimiser and scheduler state, loss
history, RNG states; temporary file + rename) at the same steps.

Timed region: Lightning's ``on_train_start`` to ``on_fit_end`` (after the logger's final flush) against the
plain loop from its first batch to its last checkpoint; both sides' loaders are built before it. Rounds
alternate the order (medpipe first, then plain first, ...) after a warm-up round of each. The benchmark checks
that both sides did the same work (steps, validation batches, checkpoints, metrics written to MLflow, and the
loss of every step, which agree exactly) before it reports.

Host-device synchronisations: counted (not timed), as calls of ``Tensor.item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``cpu`` and ``numpy`` made in the timed region outside the data loader (wrappers on
``torch.Tensor``; ``torch.cuda.set_sync_debug_mode`` is CUDA-only): on CPU none of them waits, on a GPU each
one on a device tensor is a synchronisation.

    python benchmarks/pipeline_overhead.py [--steps-per-epoch 10] [--epochs 3] [--rounds 5] [--json] [--reduced]
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after sys.path)

REPO = common.REPO
STAGE = "instruct"
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class Probe:
    """Counts while ``active``: calls of the tensor methods that synchronise on a GPU, by method and call site,
    and ``MlflowClient.log_batch`` calls / metrics. Not counted: the data pipeline (DataLoader iterator: items,
    collation, sampler), checkpoint writes (both sides copy every tensor to the host there; ``torch.save`` does
    it in C++, out of the wrappers' sight) and ``torch.optim`` internals (AdamW's step counters are CPU tensors
    on a GPU run too, unless fused / capturable: reading them never waits). Installed once for the process."""

    def __init__(self) -> None:
        self.active = False
        self.paused = 0
        self.log_batches = 0
        self.metrics_logged = 0
        self.syncs: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.optimizer_reads = 0
        self._install()

    def _install(self) -> None:
        import lightning as L
        from mlflow.tracking import MlflowClient
        from torch.utils.data.dataloader import _BaseDataLoaderIter

        probe = self
        optim_dir = os.sep + os.path.join("torch", "optim") + os.sep
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                if probe.active and not probe.paused:
                    frame = sys._getframe(1)
                    where = frame.f_code.co_filename
                    if optim_dir in where:
                        probe.optimizer_reads += 1
                    else:
                        probe.syncs[_name] += 1
                        probe.sites[f"{short_path(where)}:{frame.f_lineno} {_name}"] += 1
                return _original(self, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        for owner, name in (
            (_BaseDataLoaderIter, "__init__"),
            (_BaseDataLoaderIter, "__next__"),
            (L.Trainer, "save_checkpoint"),
        ):
            original = getattr(owner, name)

            def paused(self, *args, _original=original, **kwargs):
                probe.paused += 1
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    probe.paused -= 1

            setattr(owner, name, paused)
        log_batch = MlflowClient.log_batch

        def counted_log_batch(client, run_id, metrics=(), *args, **kwargs):
            if probe.active and metrics:
                probe.log_batches += 1
                probe.metrics_logged += len(metrics)
            return log_batch(client, run_id, metrics, *args, **kwargs)

        MlflowClient.log_batch = counted_log_batch

    def start(self) -> None:
        self.syncs, self.sites, self.optimizer_reads = Counter(), Counter(), 0
        self.log_batches, self.metrics_logged = 0, 0
        self.active = True

    def stop(self) -> dict[str, Any]:
        self.active = False
        return {
            "syncs": dict(self.syncs),
            "sync_sites": dict(self.sites.most_common()),
            "optimizer_cpu_reads": self.optimizer_reads,
            "mlflow_log_batch_calls": self.log_batches,
            "mlflow_metrics_logged": self.metrics_logged,
        }


def short_path(path: str) -> str:
    """A call site's file relative to the repository or to site-packages."""
    for root in (str(REPO) + os.sep, "site-packages" + os.sep):
        if root in path:
            return path.split(root, 1)[1]
    return path


def make_config(args, tmp: Path, side_dir: Path):
    from pipeline.config import load_config

    return load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={side_dir}",
            f"data.datasets.phantom_slake.path={tmp / 'data' / 'phantom_slake'}",
            f"data.datasets.phantom_slake.synthetic.train_images={args.train_images}",
            f"data.datasets.phantom_slake.synthetic.val_images={args.val_images}",
            "data.datasets.phantom_slake.synthetic.test_images=1",
            f"data.batch_size={args.batch_size}",
            f"evaluation.batch_size={args.val_batch_size}",
            f"data.mixture.samples_per_epoch={args.batch_size * args.steps_per_epoch}",
            f"stages.{STAGE}.max_epochs={args.epochs}",
            f"trainer.checkpoint_every_n_steps={args.checkpoint_every}",
            f"trainer.log_every_n_steps={args.log_every}",
            "trainer.enable_progress_bar=false",
            f"trainer.num_threads={args.threads}",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "mlflow.experiment_name=bench-pipeline-overhead",
            "mlflow.system_metrics=false",
            "evaluation.enabled=false",
        ],
    )


def medpipe_round(args, tmp: Path, index: int, probe: Probe, tracker) -> dict[str, Any]:
    """One ``run_stage``; returns the timed seconds and what the loop did."""
    import lightning as L

    from pipeline.runner import check_writable, run_stage
    from pipeline.stages import stage_for

    out_dir = tmp / f"medpipe-{index}"
    cfg = make_config(args, tmp, out_dir)
    check_writable(out_dir)  # run_experiment's first step: creates output_dir
    seen: dict[str, Any] = {"losses": [], "val_batches": 0, "checkpoints": 0}

    class Clock(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            probe.start()
            seen["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            probe.paused += 1  # the probe's own float() is not the pipeline's
            seen["losses"].append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            probe.paused -= 1

        def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
            seen["val_batches"] += 1

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            seen["checkpoints"] += 1

        def on_train_end(self, trainer, pl_module) -> None:
            seen.update(probe.stop())  # the loop's counts; Lightning's teardown is counted apart
            probe.start()

        def on_fit_end(self, trainer, pl_module) -> None:
            seen["end"] = time.perf_counter()
            teardown = probe.stop()
            seen["teardown_syncs"] = teardown["syncs"]
            seen["teardown_sync_sites"] = teardown["sync_sites"]
            for key in ("mlflow_log_batch_calls", "mlflow_metrics_logged"):  # the logger's final flush
                seen[key] += teardown[key]

    run_stage(
        cfg, stage_for(cfg, STAGE), init=None, tracker=tracker, out_dir=out_dir, extra_callbacks=lambda _: [Clock()]
    )
    ckpt = out_dir / "stages" / STAGE / "checkpoints" / "last.ckpt"
    seen["checkpoint_bytes"] = ckpt.stat().st_size
    seen["seconds"] = seen["end"] - seen["start"]
    return seen


def plain_round(args, tmp: Path, index: int, probe: Probe, client, experiment_id: str) -> dict[str, Any]:
    """The same stage as a hand-written loop; returns the timed seconds and what the loop did."""
    from mlflow.entities import Metric, Param

    from lightningmodules.optimization import build_optimizer
    from lightningmodules.vlm_module import model_inputs
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect
    from pipeline.stages import stage_for

    out_dir = tmp / f"plain-{index}"
    cfg = make_config(args, tmp, out_dir)
    stage = stage_for(cfg, STAGE)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, conversation=stage.config.conversation)
    stage.prepare(built.model, {})
    stage.set_trainable(built.model)
    model = built.model
    dm = connect(build_datamodule(stage.run_config(), list(stage.config.datasets)), built)
    dm.prepare_data()
    dm.setup("fit")
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    val_batches = min(len(val_loader), args.val_batches) if args.val_batches else len(val_loader)
    total_steps = args.epochs * len(train_loader)
    settings = stage.optim_settings()
    optim = build_optimizer(model.parameters(), total_steps=total_steps, **settings)
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    run_id = client.create_run(experiment_id, run_name=f"plain-{index}").info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in settings.items()])  # as Lightning logs hparams
    ckpt_dir = out_dir / "stages" / STAGE / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clip = cfg.trainer.gradient_clip_val
    every, log_every = args.checkpoint_every, args.log_every
    seen: dict[str, Any] = {"losses": [], "val_batches": 0, "checkpoints": 0}

    def log(metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def save_checkpoint(epoch: int, step: int) -> None:
        state = {
            "state_dict": model.state_dict(),
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "epoch": epoch,
            "global_step": step,
            "losses": list(seen["losses"]),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        path = ckpt_dir / "last.ckpt"
        probe.paused += 1  # not counted, as Lightning's trainer.save_checkpoint
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)  # atomic, as StageCheckpoint
        probe.paused -= 1
        seen["checkpoints"] += 1

    probe.start()
    start = time.perf_counter()
    model.train()
    step = 0
    for epoch in range(args.epochs):
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            loss = model(**model_inputs(batch)).loss
            value = loss.item()  # loss history + non-finite check, one read per step
            if not math.isfinite(value):
                raise RuntimeError(f"training loss is {value} at step {step}")
            seen["losses"].append(value)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % log_every == 0:
                log({"train/loss": value, "epoch": epoch}, step - 1)
            if every and step % every == 0:
                save_checkpoint(epoch, step)
        model.eval()
        total, count = torch.zeros(()), 0
        with torch.inference_mode():
            for i, batch in enumerate(val_loader):
                if i == val_batches:
                    break
                size = batch["input_ids"].shape[0]
                total += model(**model_inputs(batch)).loss * size
                count += size
                seen["val_batches"] += 1
        model.train()
        log({"val/loss": (total / count).item(), "epoch": epoch}, step - 1)
    seen["seconds"] = time.perf_counter() - start
    seen.update(probe.stop())
    client.set_terminated(run_id)
    seen["checkpoint_bytes"] = (ckpt_dir / "last.ckpt").stat().st_size
    return seen


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=5, help="checkpoint every N optimiser steps")
    parser.add_argument("--log-every", type=int, default=5, help="trainer.log_every_n_steps")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds of each side, not kept")
    args = parser.parse_args()
    args.train_images, args.val_images, args.val_batch_size, args.val_batches = 240, 6, 16, None
    if args.reduced:
        args.batch_size, args.steps_per_epoch, args.epochs, args.checkpoint_every, args.log_every = 4, 2, 2, 2, 1
        args.train_images, args.val_images, args.val_batch_size = 4, 1, 4
        args.rounds, args.warmup = args.rounds or 2, 0
    args.rounds = args.rounds or 5
    args.threads = args.threads or 1
    common.quiet()
    result = common.header("pipeline_overhead", args, common.load_average())

    from mlflow.tracking import MlflowClient

    from pipeline.reproducibility import cpu_numerics
    from pipeline.tracking import Tracker

    probe = Probe()
    runs: dict[str, list[dict[str, Any]]] = {"medpipe": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = make_config(args, tmp, tmp / "setup")
        with cpu_numerics(cfg.trainer):
            tracker = Tracker(tracking_uri=cfg.mlflow.tracking_uri, experiment_name=cfg.mlflow.experiment_name)
            client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
            experiment_id = tracker._experiment()
            sides = {
                "medpipe": lambda i: medpipe_round(args, tmp, i, probe, tracker),
                "plain": lambda i: plain_round(args, tmp, i, probe, client, experiment_id),
            }
            for r in range(args.warmup + args.rounds):
                for name in common.round_order(list(sides), r):
                    run = sides[name](r)
                    if r >= args.warmup:
                        runs[name].append(run)

    work_keys = ("val_batches", "checkpoints", "mlflow_log_batch_calls", "mlflow_metrics_logged")
    first = {name: side[0] for name, side in runs.items()}
    steps = len(first["plain"]["losses"])
    for key in work_keys:
        if first["medpipe"][key] != first["plain"][key]:
            raise SystemExit(f"unequal work: {key} medpipe {first['medpipe'][key]} vs plain {first['plain'][key]}")
    if len(first["medpipe"]["losses"]) != steps:
        raise SystemExit(f"unequal work: steps medpipe {len(first['medpipe']['losses'])} vs plain {steps}")
    loss_diff = max(abs(a - b) for a, b in zip(first["medpipe"]["losses"], first["plain"]["losses"], strict=True))
    seconds = {name: [run["seconds"] for run in side] for name, side in runs.items()}

    def syncs_per_step(name: str) -> float:
        return round(sum(first[name]["syncs"].values()) / steps, 3)

    result.update(
        {
            "baseline": (
                "plain PyTorch loop on the same model, loaders, optimiser and schedule: loss.item() per step, "
                "MlflowClient.log_batch of the same metrics on the same sqlite store, the same checkpoint "
                "writes (tmp + rename) and validation batches"
            ),
            "medpipe_over_plain": common.spread(common.ratios(seconds["medpipe"], seconds["plain"])),
            "ms_per_step": {
                name: common.spread([1e3 * s / steps for s in values], 2) for name, values in seconds.items()
            },
            "syncs_per_step": {name: syncs_per_step(name) for name in runs},
            "sync_calls": {name: first[name]["syncs"] for name in runs},
            "sync_sites": {name: first[name]["sync_sites"] for name in runs},
            "optimizer_cpu_reads": {name: first[name]["optimizer_cpu_reads"] for name in runs},
            "teardown_sync_calls": {
                "medpipe": first["medpipe"]["teardown_syncs"],
                "sites": first["medpipe"]["teardown_sync_sites"],
                "note": "after on_train_end, once per fit: Lightning's strategy teardown moves the model to the "
                "CPU (module.cpu(): a device-to-host copy of every tensor on a GPU); not in syncs_per_step",
            },
            "sync_count_method": (
                "calls of torch.Tensor." + "/".join(SYNC_METHODS) + " in the timed region, counted by wrapping "
                "them (torch.cuda.set_sync_debug_mode is CUDA-only; on CPU none of them waits, on a GPU each on a "
                "device tensor syncs); not counted: the DataLoader iterator, checkpoint writes, torch.optim's "
                "CPU step counters (optimizer_cpu_reads); per step = count from the first step to the end of the last "
                "validation / training steps, validation and logging included; Lightning's teardown apart"
            ),
            "work": {
                name: {"steps": len(first[name]["losses"]), "checkpoint_bytes": first[name]["checkpoint_bytes"]}
                | {key: first[name][key] for key in work_keys}
                for name in runs
            },
            "max_abs_loss_diff": loss_diff,
            "setup": {
                "model": "demo: tiny CLIP + tiny Llama, stage instruct (connector + LoRA r16)",
                "batch_size": args.batch_size,
                "steps_per_epoch": args.steps_per_epoch,
                "epochs": args.epochs,
                "steps": steps,
                "checkpoint_every_n_steps": args.checkpoint_every,
                "log_every_n_steps": args.log_every,
                "validation": "every epoch end",
                "off": "progress bar, MLflow system metrics, evaluation",
                "warmup_rounds": args.warmup,
            },
        }
    )

    def lines(res: dict) -> list[str]:
        ms = {name: common.fmt(s, " ms/step", 1) for name, s in res["ms_per_step"].items()}
        return [
            f"demo stage {STAGE}, batch {args.batch_size}, {steps} steps ({args.epochs} epochs), checkpoint every "
            f"{args.checkpoint_every}, log every {args.log_every}, {args.rounds} rounds, {args.threads} threads",
            f"  medpipe run_stage  {ms['medpipe']}",
            f"  plain loop         {ms['plain']}",
            f"  medpipe/plain      {common.fmt(res['medpipe_over_plain'])}  (target <= 1.10)",
            f"  syncs per step     medpipe {res['syncs_per_step']['medpipe']}, plain {res['syncs_per_step']['plain']}",
            f"  same work: {res['work']['plain']}; max |loss difference| {res['max_abs_loss_diff']:.2e}",
        ]

    common.emit(result, args, lines)


if __name__ == "__main__":
    main()
