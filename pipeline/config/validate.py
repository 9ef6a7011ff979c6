"""Checks the type system cannot express: choices, cross-references and paths on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.problems import ON_BAD_RECORD
from lightningmodules.models.aggregation import AGGREGATIONS
from lightningmodules.models.cmoe import ROUTER_INPUTS, WEIGHTINGS
from datamodules.readers import SPLIT_NAMES
from datamodules.readers.mecovqa import SUBSETS as MECOVQA_SUBSETS
from datamodules.specs import FORMATS, LAYOUTS, SYNTHETIC_KINDS, TASKS
from pipeline.config.errors import ConfigError
from lightningmodules.schedules import SCHEDULERS
from pipeline.config.schema import CONNECTOR_TYPES, STAGE_KINDS, TRAINABLE_GROUPS

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")


def config_source(provenance: dict[str, str], key: str, default: str) -> str:
    """The file (or ``command line``) that last set ``key`` or its closest parent."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = provenance.get(".".join(parts[:n]))
        if found:
            return found
    return default


class _Checker:
    def __init__(self, provenance: dict[str, str], default_source: str) -> None:
        self.provenance = provenance
        self.default_source = default_source

    def fail(self, key: str, reason: str) -> None:
        raise ConfigError(f"{config_source(self.provenance, key, self.default_source)}: key '{key}': {reason}")

    def choice(self, key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            self.fail(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")

    def positive(self, key: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            self.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    def model_path(self, key: str, value: str) -> None:
        if value.startswith("tiny:"):
            from lightningmodules.models.tiny import MODEL_NAMES

            self.choice(key, value.removeprefix("tiny:"), MODEL_NAMES)
        elif not Path(value).expanduser().is_dir():
            self.fail(key, f"checkpoint directory not found: {value}")

    def existing_path(self, key: str, value: str, what: str) -> None:
        if not Path(value).expanduser().exists():
            self.fail(key, f"{what} not found: {value}")


def check_semantics(cfg: DictConfig, *, provenance: dict[str, str], default_source: str,
                    check_paths: bool = True) -> None:
    c = _Checker(provenance, default_source)
    c.choice("model.connector.type", cfg.model.connector.type, CONNECTOR_TYPES)
    c.choice("model.connector.aggregation", cfg.model.connector.aggregation, AGGREGATIONS)
    connector = cfg.model.connector
    c.choice("model.connector.router_input", connector.router_input, ROUTER_INPUTS)
    c.choice("model.connector.weighting", connector.weighting, WEIGHTINGS)
    for key in ("num_experts", "num_tasks", "router_hidden_ratio"):
        c.positive(f"model.connector.{key}", connector[key])
    if connector.task_embed_dim is not None:
        c.positive("model.connector.task_embed_dim", connector.task_embed_dim)
    if connector.weighting == "sparse" and not 1 <= connector.top_k <= connector.num_experts:
        c.fail("model.connector.top_k", f"must be in [1, num_experts={connector.num_experts}], got {connector.top_k}")
    c.choice("model.vision.select_feature", cfg.model.vision.select_feature, ("patch", "cls_patch"))
    c.choice("model.llm.dtype", cfg.model.llm.dtype, ("float32", "bfloat16", "float16"))
    c.choice("data.on_bad_record", cfg.data.on_bad_record, ON_BAD_RECORD)
    c.choice("trainer.precision", str(cfg.trainer.precision), PRECISIONS)
    for key in ("data.batch_size", "data.eval_batch_size", "data.max_length", "evaluation.batch_size",
                "evaluation.max_new_tokens", "trainer.num_nodes", "trainer.accumulate_grad_batches"):
        c.positive(key, OmegaConf.select(cfg, key))
    c.positive("data.num_workers", cfg.data.num_workers, allow_zero=True)

    if cfg.data.mixture.samples_per_epoch is not None:
        c.positive("data.mixture.samples_per_epoch", cfg.data.mixture.samples_per_epoch)
    for name, ds in cfg.data.datasets.items():
        key = f"data.datasets.{name}"
        c.choice(f"{key}.format", ds.format, FORMATS)
        c.choice(f"{key}.task", ds.task, TASKS)
        c.positive(f"{key}.weight", ds.weight)
        if OmegaConf.is_missing(ds, "path"):
            c.fail(f"{key}.path", "missing: set the dataset folder")
        if check_paths and ds.synthetic is None:
            c.existing_path(f"{key}.path", ds.path, "dataset folder")
        splits = SPLIT_NAMES[ds.format]
        for split_key in ("train_split", "val_split", "test_split"):
            value = ds[split_key]
            if splits is not None and value is not None and value not in splits:
                c.fail(f"{key}.{split_key}", f"{ds.format} has no split {value!r} (it has "
                       f"{', '.join(splits)}; set null when the release has no such split)")
        for subset in ds.subsets or []:
            c.choice(f"{key}.subsets", subset, MECOVQA_SUBSETS)

    for ds in cfg.evaluation.datasets or []:
        c.choice("evaluation.datasets", ds, tuple(cfg.data.datasets.keys()))
    for name, ds in cfg.data.datasets.items():
        if ds.synthetic is not None:
            c.choice(f"data.datasets.{name}.synthetic.kind", ds.synthetic.kind,
                     SYNTHETIC_KINDS.get(ds.format, ("vqa",)))
            if ds.synthetic.layout is not None:
                c.choice(f"data.datasets.{name}.synthetic.layout", ds.synthetic.layout, LAYOUTS[ds.format])

    names = list(cfg.stages.keys())
    for i, (name, stage) in enumerate(cfg.stages.items()):
        key = f"stages.{name}"
        c.choice(f"{key}.kind", stage.kind, STAGE_KINDS)
        c.choice(f"{key}.optim.scheduler", stage.optim.scheduler, SCHEDULERS)
        c.positive(f"{key}.optim.lr", stage.optim.lr)
        if not 0 <= stage.optim.warmup_ratio < 1:
            c.fail(f"{key}.optim.warmup_ratio", f"must be in [0, 1), got {stage.optim.warmup_ratio}")
        if stage.max_epochs < 1 and stage.max_steps < 1:
            c.fail(f"{key}.max_epochs", "set max_epochs >= 1 or max_steps >= 1")
        for group in stage.train:
            c.choice(f"{key}.train", group, TRAINABLE_GROUPS)
        if "lora" in stage.train and stage.lora is None:
            c.fail(f"{key}.train", "'lora' is trainable but the stage has no lora section")
        if stage.lora is not None:
            c.positive(f"{key}.lora.r", stage.lora.r)
        for ds in stage.datasets or []:
            c.choice(f"{key}.datasets", ds, tuple(cfg.data.datasets.keys()))
        if stage.init_from is not None and stage.init_from not in names[:i]:
            if check_paths:
                c.existing_path(f"{key}.init_from", stage.init_from, "hand-over file (or an earlier stage)")

    if check_paths:
        c.model_path("model.vision.path", cfg.model.vision.path)
        c.model_path("model.llm.path", cfg.model.llm.path)
        if cfg.ckpt is not None and not str(cfg.ckpt).startswith(("models:/", "runs:/")):
            c.existing_path("ckpt", cfg.ckpt, "checkpoint")

