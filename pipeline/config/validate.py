"""Checks after the merge: each section's own ``problems`` (beside its dataclass in ``schema.py`` and
``datamodules/specs.py``), the references between sections, and paths on disk. Imports no torch.

The first problem found becomes a :class:`ConfigError` naming the file (or the command line) that last set
the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.specs import TASK_IDS
from medcore.checks import Problem, choice, finite
from medcore.choices import TINY_MODELS
from medcore.paths import is_timm_path, tiny_name
from pipeline.config.errors import ConfigError
from pipeline.config.schema import ExperimentConfig
from pipeline.stages.kinds import is_router_stage


def config_source(provenance: dict[str, str], key: str, default: str) -> str:
    """The file (or ``command line``) that last set ``key`` or its closest parent."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = provenance.get(".".join(parts[:n]))
        if found:
            return found
    return default


def check_semantics(
    cfg: DictConfig, *, provenance: dict[str, str], default_source: str, check_paths: bool = True
) -> None:
    """Raise a ConfigError for the first problem; ``check_paths=False`` skips everything on disk (checkpoint
    folders, dataset folders, hand-over files), e.g. for ``medpipe params`` on a machine without them."""
    for key, reason in problems(cfg, check_paths=check_paths):
        raise ConfigError(f"{config_source(provenance, key, default_source)}: key '{key}': {reason}")


def problems(cfg: DictConfig, *, check_paths: bool = True) -> Iterator[Problem]:
    missing = [name for name, ds in cfg.data.datasets.items() if OmegaConf.is_missing(ds, "path")]
    if missing:  # before anything reads the typed object, which needs every value
        yield f"data.datasets.{missing[0]}.path", "missing: set the dataset folder"
        return
    typed: ExperimentConfig = OmegaConf.to_object(cfg)
    yield from section_problems(typed, "")
    yield from cross_references(typed)
    yield from path_problems(typed, check_paths=check_paths)


def section_problems(node: Any, key: str) -> Iterator[Problem]:
    """Every dataclass's own ``problems(key)``, depth first in field order (sections in dicts by name); before
    them, one check for all sections: no field holds a NaN or an infinity (``medcore.checks.finite``)."""
    yield from non_finite_fields(node, key)
    if hasattr(node, "problems"):
        yield from node.problems(key)
    for f in fields(node):
        value = getattr(node, f.name)
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, child in items:
            if is_dataclass(child):
                yield from section_problems(child, ".".join(k for k in (key, f.name, name) if k))


def non_finite_fields(node: Any, key: str) -> Iterator[Problem]:
    """NaN or inf in any value field of one section (numbers, lists and dicts of them; sections are walked
    by :func:`section_problems`): what no range check written as a comparison catches."""
    for f in fields(node):
        value = getattr(node, f.name)
        if is_dataclass(value) or (isinstance(value, dict) and any(is_dataclass(v) for v in value.values())):
            continue
        yield from finite(".".join(k for k in (key, f.name) if k), value)


def cross_references(cfg: ExperimentConfig) -> Iterator[Problem]:
    """What one section says about another: dataset and stage names, task ids, groups that need a part."""
    datasets = tuple(cfg.data.datasets)
    connector = cfg.model.connector
    if connector.type == "cmoe":  # task embeddings are indexed by TASK_IDS: every image task needs one
        for name, ds in cfg.data.datasets.items():
            if ds.task in TASK_IDS and TASK_IDS[ds.task] >= connector.num_tasks:
                yield (
                    "model.connector.num_tasks",
                    f"{connector.num_tasks} task embeddings, but dataset {name!r} has "
                    f"task {ds.task!r} with task id {TASK_IDS[ds.task]} (ids: {TASK_IDS}); raise num_tasks",
                )
    if cfg.model.grounding is None:
        for name, stage in cfg.stages.items():
            for group in ("grounding", "region"):
                if group in stage.train:
                    yield (
                        f"stages.{name}.train",
                        f"group {group!r} needs model.grounding (MedPLIB's grounding head and region adapter)",
                    )
    for ds in cfg.evaluation.datasets or []:
        yield from choice("evaluation.datasets", ds, datasets)
    names = list(cfg.stages)
    for i, (name, stage) in enumerate(cfg.stages.items()):
        for ds in stage.datasets or []:
            yield from choice(f"stages.{name}.datasets", ds, datasets)
        if stage.router is not None:
            for ds in stage.router.dataset_modality:
                yield from choice(f"stages.{name}.router.dataset_modality", ds, datasets)
        yield from moe_references(cfg, name, names[:i])


def moe_references(cfg: ExperimentConfig, name: str, earlier: list[str]) -> Iterator[Problem]:
    """An ``moe`` block against the stages before it (``earlier``): one conversion, its sources and router stage."""
    stage, key = cfg.stages[name], f"stages.{name}"
    moe_groups = {"experts", "moe_router"} & set(stage.train)
    converted = [n for n in earlier if cfg.stages[n].moe is not None]
    if moe_groups and stage.moe is None and not converted:
        yield f"{key}.train", f"{sorted(moe_groups)} need MoE layers: add a moe section to this or an earlier stage"
    if stage.moe is None:
        return
    if converted:
        yield (
            f"{key}.moe",
            (f"an earlier stage already converted the LLM to MoE ({converted}); only one moe stage per experiment"),
        )
    for src in stage.moe.sources or []:
        yield from choice(f"{key}.moe.sources", src, earlier)
    if stage.moe.router_init == "modality_classifier":
        routers = [n for n in earlier if is_router_stage(cfg.stages[n])]  # validates the reference's target
        router_stage = stage.moe.router_stage or (routers[-1] if routers else None)
        if router_stage is None:
            yield f"{key}.moe.router_init", "modality_classifier needs an earlier kind: router stage"
            return
        yield from choice(f"{key}.moe.router_stage", router_stage, routers)
        if router_stage in routers:
            classes = len(cfg.stages[router_stage].router.modalities)
            if classes != stage.moe.expert_count():
                yield (
                    f"{key}.moe.num_experts",
                    f"{stage.moe.expert_count()} experts but router stage {router_stage!r} classifies "
                    f"{classes} modalities (class c initialises expert c's router row)",
                )


def path_problems(cfg: ExperimentConfig, *, check_paths: bool) -> Iterator[Problem]:
    """Model paths (``tiny:<name>`` must name a tiny model, ``timm:`` only for the vision tower), and with
    ``check_paths`` the files and folders the config names: checkpoints, datasets, hand-overs."""
    grounding = cfg.model.grounding
    if grounding is not None and grounding.sam_format == "sam_med2d" and check_paths:
        yield from existing("model.grounding.sam_path", grounding.sam_path, "SAM-Med2D checkpoint")
    elif grounding is not None and grounding.sam_format == "hf":
        yield from model_path("model.grounding.sam_path", grounding.sam_path, check_paths=check_paths)
    if check_paths:
        for name, ds in cfg.data.datasets.items():
            if ds.synthetic is None:
                yield from existing(f"data.datasets.{name}.path", ds.path, "dataset folder")
        names = list(cfg.stages)
        for i, (name, stage) in enumerate(cfg.stages.items()):
            if stage.init_from is not None and stage.init_from not in names[:i]:
                yield from existing(f"stages.{name}.init_from", stage.init_from, "hand-over file (or an earlier stage)")
    yield from model_path("model.vision.path", cfg.model.vision.path, check_paths=check_paths)
    yield from model_path("model.llm.path", cfg.model.llm.path, check_paths=check_paths)
    if not check_paths:
        return
    if is_timm_path(cfg.model.vision.path):
        if cfg.model.vision.checkpoint is None:
            yield "model.vision.checkpoint", "a timm: vision tower needs its local weights file (never downloaded)"
        else:
            yield from existing("model.vision.checkpoint", cfg.model.vision.checkpoint, "vision weights file")
    if cfg.ckpt is not None and not str(cfg.ckpt).startswith(("models:/", "runs:/")):
        yield from existing("ckpt", cfg.ckpt, "checkpoint")


def model_path(key: str, path: str, *, check_paths: bool) -> Iterator[Problem]:
    """``tiny:<name>`` names a tiny model; ``timm:`` is a vision tower; else (``check_paths``) a checkpoint folder."""
    if tiny_name(path) is not None:
        yield from choice(key, tiny_name(path), TINY_MODELS)
    elif is_timm_path(path):  # weights come from model.vision.checkpoint
        if key != "model.vision.path":
            yield key, "timm: models are vision towers only"
    elif check_paths and not Path(path).expanduser().is_dir():
        yield key, f"checkpoint directory not found: {path}"


def existing(key: str, value: str, what: str) -> Iterator[Problem]:
    if not Path(value).expanduser().exists():
        yield key, f"{what} not found: {value}"
