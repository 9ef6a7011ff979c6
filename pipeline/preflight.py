"""Checks before the first stage trains, so a wrong config fails in seconds instead of after a stage.

1. Every model path is a checkpoint folder holding what loading reads (``config.json``, the LLM's tokenizer
   files, the vision tower's ``preprocessor_config.json``, the weights): :func:`check_checkpoints`.
2. Every stage's LoRA ``target_modules`` name Linear layers of the LLM and every ``train`` group has
   parameters, on the model as that stage sees it: built once on the meta device (``weights="none"``, no
   memory), then per stage the structure it starts from (``structure_after`` of the stage before), its own
   entries with shapes only and its LoRA adapters (``Stage.apply_changes``): :func:`check_stages`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from medcore.paths import is_timm_path, tiny_name
from pipeline.model_factory import build_model
from pipeline.stages import stage_for
from pipeline.trainable import parameter_groups

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
ALL_LINEAR = "all-linear"


class PreflightError(ValueError):
    """A stage's LoRA targets or trainable groups do not resolve in the built model."""


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


def linear_names(llm: nn.Module) -> list[str]:
    """The distinct last names of the LLM's Linear layers (what LoRA ``target_modules`` match), in model order."""
    names: dict[str, None] = {}
    for name, module in llm.named_modules():
        if isinstance(module, nn.Linear):
            names.setdefault(name.rpartition(".")[2], None)
    return list(names)


def lora_problem(llm: nn.Module, target_modules: Sequence[str]) -> str | None:
    """Why ``target_modules`` do not resolve in ``llm`` (None: each names at least one Linear layer). A target
    matches a module whose dotted name is it or ends with ``.<target>``, as peft matches them."""
    targets = list(target_modules)
    if targets == [ALL_LINEAR]:
        return None
    modules = [name for name, module in llm.named_modules() if isinstance(module, nn.Linear)]
    absent = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if not absent:
        return None
    return f"{', '.join(absent)} not in the LLM (its Linear layers: {', '.join(linear_names(llm))})"


def check_stage(cfg: DictConfig, name: str, base: nn.Module) -> None:
    """Stage ``name`` on a copy of ``base`` (the built model, meta device): its LoRA targets exist, its
    structure applies and every ``train`` group has parameters; raises :class:`PreflightError`."""
    stage = stage_for(cfg, name)
    model = copy.deepcopy(base)
    stage.start_structure(model)
    lora = stage.config.lora
    if lora is not None:
        problem = lora_problem(model.llm, lora.target_modules)
        if problem is not None:
            raise PreflightError(f"stages.{name}.lora.target_modules: {problem}")
    with torch.device("meta"):  # LoRA adapters take no memory either
        stage.apply_changes(model)
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
    on the model built once on the meta device. Raises :class:`NotACheckpointError` / :class:`PreflightError`."""
    if checkpoints:
        check_checkpoints(cfg.model)
    if not len(cfg.stages):
        return
    built = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta")
    check_stages(cfg, built.model)
    log.debug("pre-flight: %d stages resolve in the model", len(cfg.stages))
