"""Checks the type system cannot express: choices, cross-references and paths on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.problems import ON_BAD_RECORD
from datamodules.readers import SPLIT_NAMES
from datamodules.readers.mecovqa import SUBSETS as MECOVQA_SUBSETS
from datamodules.specs import FORMATS, LAYOUTS, SYNTHETIC_KINDS, TASK_IDS, TASKS
from lightningmodules.models.aggregation import AGGREGATIONS
from lightningmodules.models.cmoe import ROUTER_INPUTS, WEIGHTINGS
from lightningmodules.schedules import SCHEDULERS
from pipeline.config.errors import ConfigError
from pipeline.config.schema import CONNECTOR_TYPES, MOE_LAYER_CHOICES, ROUTER_INITS, STAGE_KINDS, TRAINABLE_GROUPS
from pipeline.reproducibility import CPU_KERNELS
from pipeline.strategies import strategy_problem

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
        elif value.startswith("timm:"):  # weights come from model.vision.checkpoint (checked below)
            if key != "model.vision.path":
                self.fail(key, "timm: models are vision towers only")
        elif not Path(value).expanduser().is_dir():
            self.fail(key, f"checkpoint directory not found: {value}")

    def existing_path(self, key: str, value: str, what: str) -> None:
        if not Path(value).expanduser().exists():
            self.fail(key, f"{what} not found: {value}")


def check_semantics(
    cfg: DictConfig, *, provenance: dict[str, str], default_source: str, check_paths: bool = True
) -> None:
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
    if connector.type == "cmoe":  # task embeddings are indexed by TASK_IDS: every image task needs one
        for name, ds in cfg.data.datasets.items():
            if ds.task in TASK_IDS and TASK_IDS[ds.task] >= connector.num_tasks:
                c.fail(
                    "model.connector.num_tasks",
                    f"{connector.num_tasks} task embeddings, but dataset {name!r} has "
                    f"task {ds.task!r} with task id {TASK_IDS[ds.task]} (ids: {TASK_IDS}); raise num_tasks",
                )
    c.choice("model.vision.select_feature", cfg.model.vision.select_feature, ("patch", "cls_patch"))
    check_grounding(c, cfg, check_paths=check_paths)
    c.choice("model.llm.dtype", cfg.model.llm.dtype, ("float32", "bfloat16", "float16"))
    c.choice("data.on_bad_record", cfg.data.on_bad_record, ON_BAD_RECORD)
    c.choice("trainer.precision", str(cfg.trainer.precision), PRECISIONS)
    c.choice("trainer.cpu_kernels", cfg.trainer.cpu_kernels, CPU_KERNELS)
    if cfg.trainer.num_threads is not None:
        c.positive("trainer.num_threads", cfg.trainer.num_threads)
    check_trainer(c, cfg.trainer)
    if cfg.analysis.grad_conflict.every_n_steps is not None:
        c.positive("analysis.grad_conflict.every_n_steps", cfg.analysis.grad_conflict.every_n_steps)
        c.positive("analysis.grad_conflict.samples_per_task", cfg.analysis.grad_conflict.samples_per_task)
    if cfg.trainer.checkpoint_every_n_steps is not None:
        c.positive("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps)
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "data.max_length",
        "evaluation.batch_size",
        "evaluation.max_new_tokens",
        "trainer.num_nodes",
        "trainer.accumulate_grad_batches",
    ):
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
                c.fail(
                    f"{key}.{split_key}",
                    f"{ds.format} has no split {value!r} (it has "
                    f"{', '.join(splits)}; set null when the release has no such split)",
                )
        for subset in ds.subsets or []:
            c.choice(f"{key}.subsets", subset, MECOVQA_SUBSETS)

    for ds in cfg.evaluation.datasets or []:
        c.choice("evaluation.datasets", ds, tuple(cfg.data.datasets.keys()))
    for name, ds in cfg.data.datasets.items():
        if ds.synthetic is not None:
            c.choice(
                f"data.datasets.{name}.synthetic.kind", ds.synthetic.kind, SYNTHETIC_KINDS.get(ds.format, ("vqa",))
            )
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
        check_moe_stage(c, cfg, name, names[:i])

    if check_paths:
        c.model_path("model.vision.path", cfg.model.vision.path)
        c.model_path("model.llm.path", cfg.model.llm.path)
        if str(cfg.model.vision.path).startswith("timm:"):
            if cfg.model.vision.checkpoint is None:
                c.fail(
                    "model.vision.checkpoint", "a timm: vision tower needs its local weights file (never downloaded)"
                )
            c.existing_path("model.vision.checkpoint", cfg.model.vision.checkpoint, "vision weights file")
        if cfg.ckpt is not None and not str(cfg.ckpt).startswith(("models:/", "runs:/")):
            c.existing_path("ckpt", cfg.ckpt, "checkpoint")


def check_moe_stage(c: _Checker, cfg: DictConfig, name: str, earlier: list[str]) -> None:
    """``kind: router`` stages and ``moe`` blocks (Med-MoE / MedPLIB); ``earlier`` = stage names before it."""
    stage = cfg.stages[name]
    key = f"stages.{name}"
    if stage.kind == "router":
        if stage.router is None or len(stage.router.modalities) < 2:
            c.fail(f"{key}.router.modalities", "a router stage needs >= 2 modality names (class c = MoE expert c)")
        if len(set(stage.router.modalities)) != len(stage.router.modalities):
            c.fail(f"{key}.router.modalities", f"names repeat: {list(stage.router.modalities)}")
        for ds, modality in stage.router.dataset_modality.items():
            c.choice(f"{key}.router.dataset_modality", ds, tuple(cfg.data.datasets.keys()))
            c.choice(f"{key}.router.dataset_modality.{ds}", modality, tuple(stage.router.modalities))
        if list(stage.train) != ["modality_classifier"]:
            c.fail(
                f"{key}.train",
                f"a router stage trains the modality classifier only: set train: "
                f"[modality_classifier] (got {list(stage.train)})",
            )
        if stage.moe is not None or stage.lora is not None:
            c.fail(f"{key}.{'moe' if stage.moe is not None else 'lora'}", "a router stage changes no LLM weights")
    elif stage.router is not None:
        c.fail(f"{key}.router", "only kind: router stages take a router section")
    elif "modality_classifier" in stage.train:
        c.fail(f"{key}.train", "modality_classifier trains in a kind: router stage")
    moe_groups = {"experts", "moe_router"} & set(stage.train)
    moe_before = any(cfg.stages[n].moe is not None for n in earlier)
    if moe_groups and stage.moe is None and not moe_before:
        c.fail(f"{key}.train", f"{sorted(moe_groups)} need MoE layers: add a moe section to this or an earlier stage")
    if stage.moe is None:
        return
    moe = stage.moe
    mkey = f"{key}.moe"
    if moe_before:
        c.fail(
            mkey,
            f"an earlier stage already converted the LLM to MoE "
            f"({[n for n in earlier if cfg.stages[n].moe is not None]}); only one moe stage per experiment",
        )
    layers = moe.layers
    if isinstance(layers, str):
        c.choice(f"{mkey}.layers", layers, MOE_LAYER_CHOICES)
    else:
        values = list(layers) if layers is not None else []
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            c.fail(f"{mkey}.layers", f"every_other, all, or a non-empty list of layer indices >= 0, got {layers!r}")
    sources = list(moe.sources or [])
    for src in sources:
        c.choice(f"{mkey}.sources", src, tuple(earlier))
    if moe.sources is not None and len(sources) < 2:
        c.fail(f"{mkey}.sources", f"needs >= 2 earlier stages (one per expert), got {sources}")
    num_experts = moe.num_experts if moe.num_experts is not None else (len(sources) or 4)
    if sources and num_experts != len(sources):
        c.fail(f"{mkey}.num_experts", f"{num_experts} but sources name {len(sources)} stages (one expert each)")
    c.positive(f"{mkey}.num_experts", num_experts)
    if not 1 <= moe.top_k <= num_experts:
        c.fail(f"{mkey}.top_k", f"must be in [1, num_experts={num_experts}], got {moe.top_k}")
    if moe.capacity_factor is not None:
        c.positive(f"{mkey}.capacity_factor", moe.capacity_factor)
    for coef in ("aux_loss_coef", "z_loss_coef", "jitter"):
        c.positive(f"{mkey}.{coef}", moe[coef], allow_zero=True)
    c.choice(f"{mkey}.router_init", moe.router_init, ROUTER_INITS)
    if "moe_router" in stage.train and not moe.router_trainable:
        c.fail(f"{key}.train", "moe_router is listed but moe.router_trainable is false")
    if moe.router_init == "modality_classifier":
        routers = [n for n in earlier if cfg.stages[n].kind == "router"]
        router_stage = moe.router_stage or (routers[-1] if routers else None)
        if router_stage is None:
            c.fail(f"{mkey}.router_init", "modality_classifier needs an earlier kind: router stage")
        c.choice(f"{mkey}.router_stage", router_stage, tuple(routers))
        classes = len(cfg.stages[router_stage].router.modalities)
        if classes != num_experts:
            c.fail(
                f"{mkey}.num_experts",
                f"{num_experts} experts but router stage {router_stage!r} classifies "
                f"{classes} modalities (class c initialises expert c's router row)",
            )
    elif moe.router_stage is not None:
        c.fail(f"{mkey}.router_stage", "set only with router_init: modality_classifier")


def check_trainer(c: _Checker, trainer: DictConfig) -> None:
    """Strategy (DeepSpeed only when installed), devices, and precisions the accelerator can run."""
    problem = strategy_problem(str(trainer.strategy), str(trainer.accelerator))
    if problem:
        c.fail("trainer.strategy", problem)
    devices = trainer.devices
    if not devices_ok(devices):
        c.fail("trainer.devices", f"'auto', a count >= 1 (-1: all), a list of device indices or '0,1'; got {devices!r}")
    if trainer.accelerator == "cpu" and str(trainer.precision) in ("16-mixed", "16"):
        c.fail("trainer.precision", "16-mixed needs a GPU; on CPU use bf16-mixed or 32-true")


def devices_ok(devices: Any) -> bool:
    """Lightning's accepted ``devices`` forms: "auto", an int >= 1 or -1, a list of indices, "0,1" / "2"."""
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, str):
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        return devices == "auto" or (bool(parts) and all(p.lstrip("-").isdigit() for p in parts))
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    return False


def check_grounding(c: _Checker, cfg: DictConfig, *, check_paths: bool) -> None:
    """MedPLIB: ``model.grounding`` choices and paths; its parameter groups need it."""
    from pipeline.config.schema import SAM_FORMATS

    grounding = cfg.model.get("grounding")
    if grounding is None:
        for name, stage in cfg.stages.items():
            for group in ("grounding", "region"):
                if group in stage.train:
                    c.fail(
                        f"stages.{name}.train",
                        f"group {group!r} needs model.grounding (MedPLIB's grounding head and region adapter)",
                    )
        return
    c.choice("model.grounding.sam_format", grounding.sam_format, SAM_FORMATS)
    if grounding.sam_format == "sam_med2d" and check_paths:
        c.existing_path("model.grounding.sam_path", grounding.sam_path, "SAM-Med2D checkpoint")
    elif grounding.sam_format == "hf" and (check_paths or grounding.sam_path.startswith("tiny:")):
        c.model_path("model.grounding.sam_path", grounding.sam_path)  # tiny:<name> or a checkpoint folder
    if grounding.region and cfg.model.vision.select_feature != "patch":
        c.fail("model.grounding.region", "region prompts pool the patch grid: needs model.vision.select_feature: patch")
    weights = [("model.grounding.loss", grounding.loss)] + [
        (f"stages.{n}.grounding_loss", s.grounding_loss) for n, s in cfg.stages.items() if s.grounding_loss is not None
    ]
    for key, loss in weights:
        for term in ("ce", "bce", "dice", "focal"):
            if loss[term] < 0:
                c.fail(f"{key}.{term}", f"loss weights must be >= 0, got {loss[term]}")
