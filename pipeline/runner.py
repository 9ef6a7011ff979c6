"""The stage runner: for each stage build, restore, train, hand over; then evaluate.

What differs between stages (structure, trainable groups, LightningModule, callbacks, artifacts, whether
it is evaluated) is decided by its ``Stage`` object (``pipeline/stages/``); the runner owns the run state:
resume, MLflow runs and hand-overs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datamodules.datamodule import VQADataModule
from lightningmodules.vlm_module import NonFiniteLossError, NonFiniteWeightsError, first_non_finite
from pipeline.callbacks import LossHistory
from pipeline.checkpointing import DataPosition, RngState, StageCheckpoint, last_checkpoint
from pipeline.config import ConfigError
from pipeline.evaluation import EvalResult, evaluate_model, tracked_metrics
from pipeline.fingerprints import dataset_fingerprints, fingerprint_params
from pipeline.handover import MANIFEST_NAME, base_of, changed_keys, copy_chain, restore, save_handover, trained_names
from pipeline.model_factory import BuiltModel, build_model, checkpoint_prefixes
from pipeline.plots import learning_curve
from pipeline.preflight import check_checkpoints, preflight
from pipeline.reproducibility import cpu_numerics, kernel_fingerprint
from pipeline.run_lock import output_dir_lock
from pipeline.run_state import RunState, StageState, describe, save_run_state, state_for_resume
from pipeline.stages import Stage, stage_for
from pipeline.tracking import Tracker, check_tracking_uri, hardware_tags, version_tags
from pipeline.trainable import merge_lora
from pipeline.trainer_factory import build_trainer

log = logging.getLogger("medpipe")


@dataclass
class StageResult:
    name: str
    handover: Path
    run_id: str | None
    seconds: float
    losses: list[float]
    val_losses: list[float]
    trainable: dict[str, int]
    evaluation: EvalResult | None = None
    epoch_losses: list[float] = field(default_factory=list)  # mean training loss of each epoch


@dataclass
class ExperimentResult:
    parent_run_id: str | None
    stages: list[StageResult] = field(default_factory=list)
    evaluation: EvalResult | None = None
    seconds: float = 0.0
    model_uri: str | None = None


def check_writable(directory: Path) -> None:
    """Fail before anything is built when outputs (hand-overs, checkpoints) cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"output_dir {directory} is not writable ({e.strerror or e}); checkpoints and hand-overs "
            "go there: set output_dir to a writable folder"
        ) from None


def build_datamodule(cfg: DictConfig, dataset_names: list[str] | None = None) -> VQADataModule:
    names = dataset_names or list(cfg.data.datasets.keys())
    specs = {n: OmegaConf.to_object(cfg.data.datasets[n]) for n in names}
    return VQADataModule(
        datasets=specs,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.evaluation.batch_size,
        num_workers=cfg.data.num_workers,
        max_length=cfg.data.max_length,
        on_bad_record=cfg.data.on_bad_record,
        system_prompt=cfg.model.llm.system_prompt,
        enable_thinking=cfg.model.llm.enable_thinking,
        task_prefix=cfg.data.task_prefix,
        pad_square=cfg.model.vision.pad_square,
        seed=cfg.seed,
        one_task_per_batch=cfg.data.mixture.one_task_per_batch,
        samples_per_epoch=cfg.data.mixture.samples_per_epoch,
        verify_images=cfg.data.verify_images,
        prompt_templates=cfg.data.prompt_templates,
    )


def connect(dm: VQADataModule, built: BuiltModel) -> VQADataModule:
    return dm.connect(
        built.tokenizer,
        built.transform,
        num_image_tokens=built.model.num_image_tokens,
        sam_transform=built.sam_transform,
        region_grid_size=built.region_grid_size,
    )


def git_tags() -> dict[str, str]:
    """``medpipe.version``, ``medpipe.commit`` (medpipe run from a checkout) and ``cwd.git_commit`` (the working
    directory's checkout), each commit with its ``dirty`` flag (``pipeline.tracking.version_tags``)."""
    return version_tags()


def package_tags() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    tags = {}
    for pkg in ("torch", "lightning", "transformers", "peft", "torchmetrics", "mlflow", "medpipe"):
        try:
            tags[f"version.{pkg}"] = version(pkg)
        except PackageNotFoundError:
            pass
    return tags


# called with (stage name, model) once the model is prepared, before training: tests snapshot the weights
StageStartHook = Callable[[str, nn.Module], None]
# called with the stage name: more Lightning callbacks for that stage's trainer (after the stage's own)
StageCallbacks = Callable[[str], list[L.Callback]]


def stage_init(cfg: DictConfig, name: str, done: list[StageResult]) -> Path | None:
    """The hand-over stage ``name`` starts from: ``init_from`` (a stage name or a file), else the previous stage's."""
    init = cfg.stages[name].init_from
    by_name = {s.name: s.handover for s in done}
    if init is None:
        return done[-1].handover if done else None
    return by_name.get(init, Path(init))


def start_stage_run(
    cfg: DictConfig, name: str, *, tracker: Tracker, state: RunState, out_dir: Path
) -> tuple[str | None, Path | None, bool]:
    """The stage's MLflow run (resumed when this stage had started before the run stopped) and the checkpoint
    to continue from; records the run id in the run state. Returns (run id, checkpoint or None, resuming)."""
    stage_state = state.stage(name)
    resuming = bool(cfg.resume and stage_state.run_id)
    ckpt = last_checkpoint(out_dir / "stages" / name / "checkpoints") if resuming else None
    if resuming:
        run_id = tracker.resume_child(stage_state.run_id)
        log.info("stage %s: resuming MLflow run %s from %s", name, stage_state.run_id, ckpt or "its start")
    else:
        run_id = tracker.start_child(run_name=name, tags={"stage": name})
    stage_state.run_id = run_id or stage_state.run_id
    save_run_state(state, out_dir, is_writer=tracker.enabled)
    return run_id, ckpt, resuming


def checkpoint_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[L.Callback]:
    """Atomic ``last.ckpt`` with the data position and RNG states (``trainer.save_checkpoints``)."""
    if not cfg.trainer.save_checkpoints:
        return []
    return [StageCheckpoint(ckpt_dir, every_n_steps=cfg.trainer.checkpoint_every_n_steps), DataPosition(), RngState()]


def run_stage(
    cfg: DictConfig,
    stage: Stage,
    *,
    init: Path | None,
    tracker: Tracker,
    out_dir: Path,
    handovers: dict[str, Path] | None = None,
    state: RunState | None = None,
    on_stage_start: StageStartHook | None = None,
    extra_callbacks: StageCallbacks | None = None,
) -> StageResult:
    name, stage_dir = stage.name, out_dir / "stages" / stage.name
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # the stage's conversation preset (null: model.llm's) sets the tokenizer's template: its training and
    # evaluation prompts both come from this tokenizer
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, conversation=stage.config.conversation)
    if init is not None:
        restore(built.model, init, base=base_of(cfg.model))
        log.info("stage %s: starting from %s", name, init)
    # the hand-over holds what the stage changes from here; a run's first stage also hands over every weight no
    # checkpoint file holds (initialised at random: the connector, ...), so no restore depends on a build's RNG
    start_keys = set(built.model.state_dict())
    if init is None:
        start_keys = {k for k in start_keys if k.startswith(checkpoint_prefixes(cfg.model))}
    stage.prepare(built.model, handovers or {})
    trainable = stage.set_trainable(built.model)
    trained = trained_names(built.model)
    log.info("stage %s: training %s", name, ", ".join(f"{g} ({n:,} params)" for g, n in trainable.items()))
    if on_stage_start is not None:
        on_stage_start(name, built.model)

    run_cfg = stage.run_config()  # the stage's batch size, max length and accumulation where it sets them
    dm = connect(build_datamodule(run_cfg, list(stage.config.datasets) if stage.config.datasets else None), built)
    module = stage.module(built)
    state = state or RunState(name=cfg.name)
    run_id, ckpt, resuming = start_stage_run(cfg, name, tracker=tracker, state=state, out_dir=out_dir)
    history = LossHistory()
    callbacks = [
        history,
        *stage.callbacks(module, tracker=tracker, run_id=run_id),
        *checkpoint_callbacks(cfg, stage_dir / "checkpoints"),
        *(extra_callbacks(name) if extra_callbacks is not None else []),
    ]
    trainer = build_trainer(
        run_cfg.trainer,
        max_epochs=stage.config.max_epochs,
        max_steps=stage.config.max_steps,
        logger=tracker.lightning_logger(run_id),
        callbacks=callbacks,
        root_dir=stage_dir,
        enable_checkpointing=cfg.trainer.save_checkpoints,
    )
    with tracker.system_metrics(run_id, cfg.mlflow.system_metrics, cfg.mlflow.system_metrics_interval, resume=resuming):
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
        except NonFiniteLossError as e:
            kept = last_checkpoint(stage_dir / "checkpoints")
            raise NonFiniteLossError(f"stage {name}: {e}; last good checkpoint: {kept or 'none written yet'}") from None
    log_stage_records(tracker, run_id, dm, history, name)
    check_finite_weights(name, built.model)
    stage.log_artifacts(module, tracker=tracker, run_id=run_id, out_dir=stage_dir)
    lora = stage.config.lora
    handover = save_handover(  # before the merge: LoRA adapters travel as their factors
        built.model,
        stage_dir / MANIFEST_NAME,
        stage=name,
        meta={"trainable": trainable},
        changed=changed_keys(built.model, trained=trained, start_keys=start_keys),
        previous=init,
        base=base_of(cfg.model),
        lora=None if lora is None else OmegaConf.to_container(lora, resolve=True),
    )
    merge_lora(built.model)  # evaluation and later stages see the plain model
    result = StageResult(
        name=name,
        handover=handover,
        run_id=run_id,
        seconds=0.0,
        losses=history.losses,
        val_losses=history.val_losses,
        trainable=trainable,
        epoch_losses=history.epoch_losses,
    )
    stage_state = state.stage(name)
    stage_state.handover, stage_state.trainable = str(handover), dict(trainable)
    stage_state.losses, stage_state.val_losses = list(history.losses), list(history.val_losses)
    stage_state.epoch_losses = list(history.epoch_losses)
    if cfg.evaluation.enabled and cfg.evaluation.after_each_stage and stage.evaluated:
        if cfg.trainer.strategy == "fsdp2":  # the trained model is sharded: evaluate a whole one, from the hand-over
            module, built = (
                None,
                build_model(cfg.model, cache_dir=cfg.cache_dir, conversation=stage.config.conversation),
            )
            restore(built.model, handover, base=base_of(cfg.model))
        result.evaluation = evaluate_model(
            cfg, built, tracker=tracker, run_id=run_id, out_dir=stage_dir / "eval", module=module, source=handover
        )
    result.seconds = stage_state.seconds = time.perf_counter() - start
    stage_state.status = "done"
    save_run_state(state, out_dir, is_writer=tracker.enabled)
    tracker.finish(run_id)
    return result


def check_finite_weights(name: str, model: nn.Module) -> None:
    """Before a stage hands over: every trained weight is finite, else the stage fails naming the first bad one
    (nothing is handed over, evaluated or registered)."""
    found = first_non_finite(model)
    if found is not None:
        param, value = found
        raise NonFiniteWeightsError(
            f"stage {name}: trained weight {param} is {value} after training: nothing handed over or registered "
            f"(lower stages.{name}.optim.lr, or set trainer.gradient_clip_val)"
        )


def finished_stage(name: str, stage_state: StageState) -> StageResult | None:
    """A stage a resumed run already finished (its hand-over on disk), as a result without re-training."""
    if stage_state.status != "done" or not stage_state.handover or not Path(stage_state.handover).is_file():
        return None
    return StageResult(
        name=name,
        handover=Path(stage_state.handover),
        run_id=stage_state.run_id,
        seconds=stage_state.seconds,
        losses=stage_state.losses,
        val_losses=stage_state.val_losses,
        epoch_losses=stage_state.epoch_losses,
        trainable=stage_state.trainable,
    )


def log_split_skips(tracker: Tracker, run_id: str | None, dm: VQADataModule) -> None:
    """What each split's read left out (``VQADataModule.split_problems`` / ``split_filtered``), into ``run_id``'s
    params (counts, not charts): ``data.<split>.skipped``, ``data.<split>.skipped_<kind>``, ``data.<split>.filtered``,
    and each skipped record (file, record, field, reason) in ``data/skipped_<split>.json``. A stage's run and its
    evaluation's (the same run with ``after_each_stage``) both log them: the values of a split agree."""
    counts: dict[str, int] = {}
    for split in sorted(set(dm.split_problems) | set(dm.split_filtered)):
        problems = dm.split_problems.get(split, [])
        counts[f"data.{split}.skipped"] = len(problems)
        counts.update({f"data.{split}.skipped_{k}": v for k, v in Counter(p.kind for p in problems).items()})
        counts[f"data.{split}.filtered"] = sum(dm.split_filtered.get(split, Counter()).values())
        if problems:
            rows = [p.as_dict() for p in problems]
            tracker.log_text(run_id, json.dumps(rows, indent=2) + "\n", f"data/skipped_{split}.json")
    tracker.log_params(run_id, {k: str(v) for k, v in counts.items()})


def log_stage_records(tracker: Tracker, run_id: str | None, dm: VQADataModule, history: LossHistory, name: str) -> None:
    """Skipped-record counts as params (``data.skipped``, ``data.skipped_<kind>`` over the splits the stage read,
    and per split), dataset fingerprints and the learning curve of one stage."""
    counts = {
        "data.skipped": len(dm.problems.problems),
        **{f"data.skipped_{k}": v for k, v in dm.problems.counts().items()},
    }
    tracker.log_params(run_id, {k: str(v) for k, v in counts.items()})
    log_split_skips(tracker, run_id, dm)
    if not tracker.enabled or run_id is None:
        return
    fingerprints = dataset_fingerprints(dm)
    tracker.log_params(run_id, fingerprint_params(fingerprints))
    tracker.log_text(run_id, json.dumps(fingerprints, indent=2), "data/fingerprints.json")
    if history.losses:
        import matplotlib.pyplot as plt

        figure = learning_curve(history.losses, history.val_losses, title=f"stage {name}")
        tracker.log_figure(run_id, figure, "plots/learning_curve.png")
        plt.close(figure)


def register_final_model(
    cfg: DictConfig, tracker: Tracker, run_id: str | None, handover: Path, out_dir: Path
) -> str | None:
    """Register the final model: the resolved config and the hand-over chain ending at ``handover`` (each
    stage's delta; ``mlflow.register_weights: full``: one hand-over with every weight) under ``model/``."""
    if not tracker.enabled or run_id is None:
        return None
    config_file = out_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    folder = out_dir / "registered"
    shutil.rmtree(folder, ignore_errors=True)  # a resumed run registers again: no stale links
    complete = cfg.mlflow.register_weights == "full"
    model = None
    if complete:
        model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
        restore(model, handover, base=base_of(cfg.model))
    copy_chain(handover, folder, complete=complete, model=model)
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    uri = tracker.register_model(
        run_id, name=cfg.mlflow.model_name or f"medpipe-{cfg.name}", files={**files, "config.yaml": config_file}
    )
    if uri:
        log.info("registered %s (load it with pipeline.registry.load_registered)", uri)
    return uri


def run_experiment(
    cfg: DictConfig,
    *,
    on_stage_start: StageStartHook | None = None,
    extra_callbacks: StageCallbacks | None = None,
) -> ExperimentResult:
    """Train every stage in order, each starting from the previous one's hand-over, then evaluate.

    ``on_stage_start(name, model)`` runs once each stage's model is prepared, before it trains;
    ``extra_callbacks(name)`` adds Lightning callbacks to that stage's trainer."""
    # cpu_numerics before the first tensor operation of the run; one running experiment per output_dir
    with cpu_numerics(cfg.trainer), output_dir_lock(cfg.output_dir):
        return _run_experiment(cfg, on_stage_start, extra_callbacks)


def _run_experiment(
    cfg: DictConfig, on_stage_start: StageStartHook | None, extra_callbacks: StageCallbacks | None
) -> ExperimentResult:
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    check_tracking_uri(cfg.mlflow.tracking_uri, settings=cfg.mlflow)  # also bounds MLflow's HTTP retries
    check_writable(out_dir)
    preflight(cfg)  # checkpoint folders, every stage's LoRA targets and trainable groups: before anything trains
    tracker = Tracker(tracking_uri=cfg.mlflow.tracking_uri, experiment_name=cfg.mlflow.experiment_name)
    tags = {
        "recipe": cfg.name,
        **git_tags(),
        **package_tags(),
        **hardware_tags(),
        **{f"repro.{k}": v for k, v in kernel_fingerprint().items()},
        **dict(cfg.mlflow.tags),
    }
    if cfg.resume:
        state = state_for_resume(out_dir, cfg.name)
        parent = tracker.resume_parent(state.parent_run_id) if state.parent_run_id else None
        log.info("resuming %s (MLflow run %s): %s", cfg.name, state.parent_run_id, describe(state))
        close_open_runs(tracker, state, "KILLED", stages=False)  # an evaluation the stopped process left open
    else:
        state = RunState(name=cfg.name)
        parent = tracker.start_parent(run_name=cfg.mlflow.run_name or cfg.name, cfg=cfg, tags=tags)
    state.parent_run_id = parent or state.parent_run_id
    save_run_state(state, out_dir, is_writer=tracker.enabled)
    result = ExperimentResult(parent_run_id=parent)
    status = "FAILED"
    try:
        for name in cfg.stages.keys():
            done = finished_stage(name, state.stages[name]) if name in state.stages else None
            if done is not None:
                log.info("stage %s: finished before the resume, hand-over %s", name, done.handover)
                result.stages.append(done)
                continue
            result.stages.append(
                run_stage(
                    cfg,
                    stage_for(cfg, name),
                    init=stage_init(cfg, name, result.stages),
                    tracker=tracker,
                    out_dir=out_dir,
                    handovers={s.name: s.handover for s in result.stages},
                    state=state,
                    on_stage_start=on_stage_start,
                    extra_callbacks=extra_callbacks,
                )
            )
        if cfg.evaluation.enabled and not cfg.evaluation.after_each_stage:
            if not result.stages:
                raise ValueError("nothing to evaluate: the experiment has no stages (use `medpipe evaluate`)")
            result.evaluation = final_evaluation(cfg, result.stages[-1], tracker=tracker, state=state, out_dir=out_dir)
        elif result.stages:
            result.evaluation = result.stages[-1].evaluation
        log_final_metrics(tracker, parent, result.evaluation)
        tracker.log_child_datasets(parent)
        if cfg.mlflow.register_model and result.stages:
            result.model_uri = register_final_model(cfg, tracker, parent, result.stages[-1].handover, out_dir)
        rows = results_rows(result)
        tracker.log_text(parent, format_table(rows) + "\n", "results/results_table.txt")
        tracker.log_text(parent, json.dumps(rows, indent=2) + "\n", "results/results.json")
        status = "FINISHED"
        if tracker.enabled and parent is not None:
            log.info("MLflow: %s", tracker.runs_page())
        state.status = "finished"
        save_run_state(state, out_dir, is_writer=tracker.enabled)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        result.seconds = time.perf_counter() - start
        if status != "FINISHED":
            close_open_runs(tracker, state, status)
            save_run_state(state, out_dir, is_writer=tracker.enabled)
        tracker.finish(parent, status)
    return result


def log_final_metrics(tracker: Tracker, parent: str | None, evaluation: EvalResult | None) -> None:
    """The final evaluation's MLflow metrics (``pipeline.evaluation.tracked_metrics``: headline, protocols, tasks,
    baseline) on the experiment run too, so experiment runs compare in the runs table without expanding them."""
    if evaluation is None or not evaluation.metrics:
        return
    tracker.log_metrics(parent, tracked_metrics(evaluation.metrics, evaluation.baseline))
    tracker.set_tags(parent, {"evaluation.split": evaluation.split})


def close_open_runs(tracker: Tracker, state: RunState, status: str, *, stages: bool = True) -> None:
    """End the MLflow runs the run state holds open with ``status``: the final evaluation's and (``stages``) those
    of unfinished stages (a resume continues these). Nothing is left RUNNING after a failure, and a resume
    closes the evaluation run of a process that was killed (``stages=False``: its stage runs are continued)."""
    open_runs = [state.evaluation_run_id] if state.evaluation_run_id else []
    open_runs += [s.run_id for s in state.stages.values() if stages and s.status != "done" and s.run_id]
    for run_id in open_runs:
        end_run(tracker, run_id, status)
    if state.evaluation_run_id:
        log.info("MLflow run %s of the unfinished final evaluation ended as %s", state.evaluation_run_id, status)
        state.evaluation_run_id = None


def end_run(tracker: Tracker, run_id: str | None, status: str) -> None:
    """End ``run_id`` on a failure path: a run that cannot be ended is a warning, never the error reported."""
    try:
        tracker.finish(run_id, status)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        log.warning("MLflow run %s could not be ended as %s: %s", run_id, status, reason)


def final_evaluation(
    cfg: DictConfig, last: StageResult, *, tracker: Tracker, state: RunState, out_dir: Path
) -> EvalResult:
    """The last hand-over evaluated in its own nested run, whose id the run state holds while it is open (a
    resume after a kill mid-evaluation finds it and closes it)."""
    run_id = tracker.start_child(run_name="evaluate", tags={"stage": "evaluate", "checkpoint": str(last.handover)})
    state.evaluation_run_id = run_id
    save_run_state(state, out_dir, is_writer=tracker.enabled)
    evaluation = evaluate_handover(
        cfg,
        last.handover,
        tracker=tracker,
        out_dir=out_dir / "eval",
        conversation=cfg.stages[last.name].conversation,  # the prompts the last stage trained on
        run_id=run_id,
    )
    state.evaluation_run_id = None  # evaluate_handover ended it
    save_run_state(state, out_dir, is_writer=tracker.enabled)
    return evaluation


def evaluate_handover(
    cfg: DictConfig,
    handover: str | Path | None,
    *,
    tracker: Tracker,
    out_dir: Path,
    run_name: str = "evaluate",
    conversation: str | None = None,
    run_id: str | None = None,
) -> EvalResult:
    """Build the model from the config, load a hand-over file (None: the model as built, e.g. a released
    checkpoint ``model.init`` imports) and evaluate it in a nested run (``run_id``, else a new one named
    ``run_name``), ended FAILED (KILLED on Ctrl-C) when the evaluation fails;
    ``conversation``: the preset of the prompts (a stage's ``conversation``; None: ``model.llm``'s)."""
    with cpu_numerics(cfg.trainer):
        if run_id is None:
            source = (
                str(handover) if handover is not None else f"model.init {cfg.model.init.format}:{cfg.model.init.path}"
            )
            run_id = tracker.start_child(run_name=run_name, tags={"stage": "evaluate", "checkpoint": source})
        try:
            return _evaluate_handover(
                cfg, handover, tracker=tracker, out_dir=out_dir, run_id=run_id, conversation=conversation
            )
        except BaseException as e:
            end_run(tracker, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise


def _evaluate_handover(
    cfg: DictConfig,
    handover: str | Path | None,
    *,
    tracker: Tracker,
    out_dir: Path,
    run_id: str | None,
    conversation: str | None = None,
) -> EvalResult:
    start = time.perf_counter()
    check_checkpoints(cfg.model)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, conversation=conversation)
    if handover is not None:
        restore(built.model, handover, base=base_of(cfg.model))
    source = handover if handover is not None else f"model.init {cfg.model.init.format}:{cfg.model.init.path}"
    result = evaluate_model(cfg, built, tracker=tracker, run_id=run_id, out_dir=out_dir, source=source)
    result.seconds = time.perf_counter() - start
    tracker.finish(run_id)
    return result


def results_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    rows = []
    for stage in result.stages:
        ev = stage.evaluation
        rows.append(
            {
                "stage": stage.name,
                "split": ev.split if ev else "-",
                "closed_acc": ev.metrics.get("closed_accuracy") if ev else None,
                "open_recall": ev.metrics.get("open_recall") if ev else None,
                "bleu1": ev.metrics.get("bleu1") if ev else None,
                "majority_closed": ev.baseline.get("closed_accuracy") if ev else None,
                "majority_open": ev.baseline.get("open_recall") if ev else None,
                "loss_first": stage.losses[0] if stage.losses else None,
                "loss_last": stage.losses[-1] if stage.losses else None,
                "seconds": stage.seconds,
            }
        )
    if result.evaluation is not None and all(s.evaluation is None for s in result.stages):
        ev = result.evaluation
        rows.append(
            {
                "stage": "evaluate",
                "split": ev.split,
                "closed_acc": ev.metrics.get("closed_accuracy"),
                "open_recall": ev.metrics.get("open_recall"),
                "bleu1": ev.metrics.get("bleu1"),
                "majority_closed": ev.baseline.get("closed_accuracy"),
                "majority_open": ev.baseline.get("open_recall"),
                "loss_first": None,
                "loss_last": None,
                "seconds": ev.seconds,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        ("stage", "stage"),
        ("split", "split"),
        ("closed_acc", "closed acc"),
        ("open_recall", "open recall"),
        ("bleu1", "BLEU-1"),
        ("majority_closed", "majority closed"),
        ("majority_open", "majority open"),
        ("loss_first", "loss first"),
        ("loss_last", "loss last"),
        ("seconds", "time s"),
    ]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [[h for _, h in headers]] + [[cell(r.get(k)) for k, _ in headers] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
