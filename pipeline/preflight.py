"""Checks before the first stage trains, so a wrong config fails in seconds instead of after a stage.

1. Every model path is a checkpoint folder holding what loading reads (``config.json``, the LLM's tokenizer
   files, the vision tower's ``preprocessor_config.json``, the weights): :func:`check_checkpoints`.
2. Every stage's LoRA ``target_modules`` name Linear layers of the LLM and every ``train`` group has
   parameters, on the model as that stage sees it: built once on the meta device (``weights="none"``, no
   memory), then per stage the structure it starts from (``structure_after`` of the stage before), its own
   entries with shapes only and its LoRA adapters (``Stage.apply_changes``): :func:`check_stages`.
3. The first record of every split a stage reads, of every dataset it reads, encodes with the model's
   tokenizer and chat template as the DataModule encodes it (training for train / val, the generation prompt
   for evaluation), so a template error, a rejected role, a dropped ``<image>`` or a prompt over
   ``data.max_length`` fails naming stage, dataset, split and record: :func:`check_data`.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from datamodules.encoding import PromptTooLongError
from datamodules.problems import ProblemLog
from datamodules.readers import read_split
from datamodules.records import Record
from datamodules.specs import DatasetSpec
from datamodules.writers import COMPLETE_MARKER, ensure_synthetic
from medcore.paths import is_timm_path, tiny_name
from pipeline.model_factory import BuiltModel, build_model
from pipeline.stages import stage_for
from pipeline.trainable import LoraTargetError, parameter_groups
from pipeline.trainable import linear_names as linear_names  # re-exported: the names a LoRA error lists

log = logging.getLogger("medpipe")

CONFIG_FILE = "config.json"
# any one of these is a weights file (sharded checkpoints name their shards in the index)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# any one of these lets AutoTokenizer build a tokenizer (fast, SentencePiece, BPE vocab, WordPiece, tiktoken)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "qwen.tiktoken")
PROCESSOR_FILE = "preprocessor_config.json"


class PreflightError(ValueError):
    """A stage's LoRA targets or trainable groups do not resolve in the built model, or a dataset's first record
    does not encode with the model's chat template."""


class NotACheckpointError(FileNotFoundError):
    """A model path that is not a checkpoint folder; the message names the key, the folder and the missing files."""


def missing_checkpoint_files(
    directory: Path, *, tokenizer: bool = False, processor: bool = False, weights: bool = True
) -> list[str]:
    """What the folder ``directory`` lacks to be loaded as a checkpoint (empty: nothing); an item names a file,
    or the files of which one is needed."""
    present = {p.name for p in directory.iterdir()}
    missing = [] if CONFIG_FILE in present else [CONFIG_FILE]
    if tokenizer and not present & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in present):
        missing.append("tokenizer files (one of " + ", ".join(TOKENIZER_FILES) + ")")
    if processor and PROCESSOR_FILE not in present:
        missing.append(PROCESSOR_FILE)
    if weights and not present & set(WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(WEIGHT_FILES) + ")")
    return missing


def require_checkpoint(
    key: str, path: str, *, tokenizer: bool = False, processor: bool = False, weights: bool = True
) -> None:
    """Raise :class:`NotACheckpointError` when ``path`` (not ``tiny:`` / ``timm:``) is not a checkpoint folder;
    ``tokenizer`` / ``processor`` / ``weights``: what loading it reads besides its ``config.json``."""
    if tiny_name(path) is not None or is_timm_path(path):
        return  # the zoo builds tiny folders exactly as a download looks; timm weights are model.vision.checkpoint
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise NotACheckpointError(f"{key}: {path} is not a checkpoint folder: it does not exist or is a file")
    missing = missing_checkpoint_files(directory, tokenizer=tokenizer, processor=processor, weights=weights)
    if missing:
        raise NotACheckpointError(
            f"{key}: {path} is not a checkpoint folder: no {'; no '.join(missing)} in it "
            "(point it at a folder saved with save_pretrained, as a download from the Hub looks)"
        )


def check_checkpoints(model_cfg: DictConfig) -> None:
    """Every checkpoint folder of ``model:`` holds what ``build_model(weights="pretrained")`` reads."""
    llm = model_cfg.llm
    # trust_remote_code tokenizers may read files of their own: only config.json and weights are required
    require_checkpoint("model.llm.path", llm.path, tokenizer=not llm.trust_remote_code)
    require_checkpoint("model.vision.path", model_cfg.vision.path, processor=True)
    grounding = model_cfg.get("grounding")
    if grounding is not None and grounding.sam_format == "hf":
        require_checkpoint("model.grounding.sam_path", grounding.sam_path)


def check_stage(cfg: DictConfig, name: str, base: nn.Module) -> None:
    """Stage ``name`` on a copy of ``base`` (the built model, meta device): its LoRA targets exist, its
    structure applies and every ``train`` group has parameters; raises :class:`PreflightError`."""
    stage = stage_for(cfg, name)
    model = copy.deepcopy(base)
    stage.start_structure(model)
    with torch.device("meta"):  # LoRA adapters take no memory either
        try:  # its structure first (MoE layers the ``experts`` target adapts), then LoRA on lora_targets
            stage.apply_changes(model)
        except LoraTargetError as error:
            raise PreflightError(f"stages.{name}.lora.target_modules: {error}") from None
    if cfg.trainer.strategy == "fsdp2":  # the units FSDP2 would shard: tied weights refused here, not mid-fit
        from lightningmodules.sharding import sharding_units

        try:
            sharding_units(model)
        except ValueError as error:
            raise PreflightError(f"stages.{name}: {error}") from None
    groups = parameter_groups(model)
    empty = [g for g in stage.trained_groups() if not groups.get(g)]
    if empty:
        have = [g for g, names in groups.items() if names]
        raise PreflightError(
            f"stages.{name}.train: {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no parameters in "
            f"this model (groups with parameters: {', '.join(have)})"
        )


def check_stages(cfg: DictConfig, model: nn.Module) -> None:
    """:func:`check_stage` for every stage, in order, on the model as built from ``cfg.model``."""
    for name in cfg.stages.keys():
        check_stage(cfg, name, model)


def preflight(cfg: DictConfig, *, checkpoints: bool = True) -> None:
    """Everything checked before the first stage: the checkpoint folders (``checkpoints``), then every stage
    on the model built once on the meta device, then the first record of every dataset split the stages read,
    encoded with that model's tokenizer. Raises :class:`NotACheckpointError` / :class:`PreflightError`."""
    if checkpoints:
        check_checkpoints(cfg.model)
    if not len(cfg.stages):
        return
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta")
    check_stages(cfg, built.model)
    log.debug("pre-flight: %d stages resolve in the model", len(cfg.stages))
    check_data(cfg, built)


# one encoding the run makes: (where: "stages.<name>" or "evaluation", dataset, pipeline split, with answers)
DataCheck = tuple[str, str, str, bool]


def data_checks(cfg: DictConfig) -> list[DataCheck]:
    """Every (dataset, split, encoding) the run reads, once, named after the first stage that reads it: each
    stage's datasets (``stages.<name>.datasets``, else all) in training (train and val splits, with answers)
    and the evaluation datasets' ``evaluation.split`` as generation prompts (after each evaluated stage, or
    once at the end)."""
    every = list(cfg.data.datasets.keys())
    evaluation = cfg.evaluation
    evaluated = list(evaluation.datasets) if evaluation.datasets else every
    checks: dict[tuple[str, str, bool], str] = {}
    for name in cfg.stages.keys():
        for dataset in list(cfg.stages[name].datasets or every):
            for split in ("train", "val"):
                checks.setdefault((dataset, split, True), f"stages.{name}")
        if evaluation.enabled and evaluation.after_each_stage and stage_for(cfg, name).evaluated:
            for dataset in evaluated:
                checks.setdefault((dataset, evaluation.split, False), f"stages.{name} (evaluation)")
    if evaluation.enabled and not evaluation.after_each_stage:
        for dataset in evaluated:
            checks.setdefault((dataset, evaluation.split, False), "evaluation")
    return [(where, dataset, split, answers) for (dataset, split, answers), where in checks.items()]


def check_data(cfg: DictConfig, built: BuiltModel) -> None:
    """The first record of each (dataset, split) of :func:`data_checks` encoded by the DataModule's own
    ``ConversationEncoder`` on ``built``'s tokenizer (prompt templates applied as at evaluation); raises a one-line
    :class:`PreflightError` naming stage, dataset, split, record and the encoder's reason. Reads annotations only
    (no image is opened); writes a ``synthetic:`` dataset first (local rank 0; other ranks skip one not yet
    written). Nothing to check for a built-in architecture without tokenizer files (``tokenizer`` None)."""
    if built.tokenizer is None:
        return
    from pipeline.runner import build_datamodule, connect  # the runner imports this module

    checks = data_checks(cfg)
    dm = connect(build_datamodule(cfg, list(dict.fromkeys(dataset for _, dataset, _, _ in checks))), built)
    firsts: dict[tuple[str, str], Record | None] = {}
    for where, dataset, split, with_answers in checks:
        spec = dm.datasets[dataset]
        release = dm.release_split(spec, split)
        if not release:
            continue
        if (dataset, release) not in firsts:
            firsts[dataset, release] = first_record(spec, dataset, release, dm.problems)
        record = firsts[dataset, release]
        if record is None:
            continue
        if dm.prompts is not None:
            record = dm.prompts.apply(record)
        try:
            dm.encoder.encode(record, with_answers=with_answers)
        except ValueError as e:
            if isinstance(e, PromptTooLongError) and cfg.data.on_bad_record == "skip":
                continue  # under skip the DataModule leaves such records out, counted (prompt_too_long)
            cause = " ".join(str(e).removeprefix(f"record {record.id}: ").split())
            encoding = "training encoding" if with_answers else "generation prompt"
            raise PreflightError(
                f"{where}: dataset {dataset}, {split} split ({release}), record {record.id} ({encoding}): {cause}"
            ) from None
    log.debug("pre-flight: %d dataset splits encode with the chat template", len(firsts))


def first_record(spec: DatasetSpec, name: str, release: str, problems: ProblemLog) -> Record | None:
    """The first record of the release split ``release`` (None: no record, or synthetic data another rank
    is still to write)."""
    if spec.synthetic is not None and not (Path(spec.path) / COMPLETE_MARKER).is_file():
        if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
            return None  # local rank 0 writes it (as the DataModule's prepare_data would)
        if ensure_synthetic(spec):
            log.info("wrote synthetic %s dataset %r to %s", spec.format, name, spec.path)
    records = read_split(spec, name, release, problems, check_images=False)
    return records[0] if records else None
