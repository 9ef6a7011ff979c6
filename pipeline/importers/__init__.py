"""Start from a released checkpoint: its weights, mapped strictly into the model ``model:`` builds.

``model.init: {format, path}`` (``IMPORT_FORMATS``): the builder makes the parts the checkpoint fills from
their configs only (no second load of the same weights), then :func:`import_checkpoint` maps every source
key by the format's rules (``keymap.py``: every source key used or left out with a reason, every target key
filled, shapes equal) and loads them.

Each format is a :class:`Layout` in ``FORMATS``: its module gives the rules, the settings check (a config value
that disagrees with the checkpoint names the config key), the parts it fills, the LLM / vision configs inside the
folder, the model structure the checkpoint's model has (e.g. MoE layers, applied before the weights) and views of
model keys that are not one source key each (stacked experts). Formats: ``llava`` (LLaVA-1.5 / LLaVA-Med v1.5, the
original layout) and ``hf_llava`` (transformers' ``LlavaForConditionalGeneration``), ``llava.py``; ``moe_llava``
(MoE-LLaVA and Med-MoE, DeepSpeed MoE layers), ``moe_llava.py``; ``medplib`` (MedPLIB's stage-IV folder: SAM-Med2D,
SEG projection, region adapter, MoE layers), ``medplib.py``; ``uni_med`` (Uni-Med's ``.pth``: the CMoE connector, task
tokens and LoRA merged into the LLM from ``model.llm.path``), ``uni_med.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pipeline.importers import llava, medplib, moe_llava, uni_med
from pipeline.importers.checkpoints import checkpoint_keys, read_config, read_state_dict
from pipeline.importers.keymap import (
    VOCAB_SUFFIXES,
    CheckpointLayoutError,
    ImportReport,
    Rule,
    copy_vocab_rows,
    map_state_dict,
)

log = logging.getLogger("medpipe")

__all__ = [
    "FORMATS",
    "CheckpointLayoutError",
    "ImportReport",
    "Layout",
    "apply_import_structure",
    "detect_format",
    "import_checkpoint",
    "imported_parts",
    "llm_config_dict",
    "vision_config_dict",
]


class Layout(Protocol):
    """What a format provides (``llava.py`` through :class:`_LlavaLayout`, ``moe_llava.py``, ...)."""

    name: str

    def read_config(self, path: Path) -> dict[str, Any]:
        """The checkpoint's own settings (``config.json``; a layout without one returns ``{}``)."""

    def llm_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The LLM's transformers config (with its ``model_type``) when the config is this layout's; else None."""

    def vision_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The vision tower's transformers config when the folder carries it; else None."""

    def parts(self, keys: list[str]) -> set[str]:
        """The model parts the checkpoint fills (``PART_PREFIXES``), from its keys."""

    def check_settings(self, config: dict[str, Any], model_cfg: Any, path: Path, keys: list[str]) -> None:
        """Raise :class:`CheckpointLayoutError` naming the config key that disagrees with the checkpoint."""

    def structure(self, config: dict[str, Any], keys: list[str], path: Path) -> list[dict[str, Any]]:
        """``pipeline/structure.py`` entries the checkpoint's model has (applied before its weights)."""

    def rules(self, config: dict[str, Any], model_cfg: Any) -> list[Rule]:
        """Source key -> model key, or left out with a reason."""

    def views(
        self, model: nn.Module, source: Mapping[str, torch.Tensor], config: dict[str, Any]
    ) -> moe_llava.TargetViews | None:
        """Model keys the checkpoint fills from several keys (stacked experts) or updates (LoRA), shown as the
        source's keys."""


class _LlavaLayout:
    """``llava.py``'s two layouts as a :class:`Layout`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def read_config(self, path: Path) -> dict[str, Any]:
        return read_config(path)

    def llm_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return llava.llm_config_dict(config)

    def vision_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return llava.vision_config_dict(config)

    def parts(self, keys: list[str]) -> set[str]:
        return {"llm", "connector"} | ({"vision"} if llava.has_vision_weights(self.name, keys) else set())

    def check_settings(self, config: dict[str, Any], model_cfg: Any, path: Path, keys: list[str]) -> None:
        llava.check_settings(self.name, config, model_cfg, path)

    def structure(self, config: dict[str, Any], keys: list[str], path: Path) -> list[dict[str, Any]]:
        return []

    def rules(self, config: dict[str, Any], model_cfg: Any) -> list[Rule]:
        return llava.rules_for(self.name)

    def views(self, model: nn.Module, source: Mapping[str, torch.Tensor], config: dict[str, Any]) -> None:
        return None


FORMATS: dict[str, Layout] = {
    "llava": _LlavaLayout("llava"),
    "hf_llava": _LlavaLayout("hf_llava"),
    "moe_llava": moe_llava.LAYOUT,
    "medplib": medplib.LAYOUT,
    "uni_med": uni_med.LAYOUT,
}
# which layout a folder's config.json belongs to: LLaVA last (MoE-LLaVA's dense models use LLaVA's type names,
# MedPLIB's config has LLaVA's mm_projector_type)
DETECTION_ORDER = ("moe_llava", "medplib", "llava")
# the state-dict prefix of each part a layout fills
PART_PREFIXES = {
    "vision": "vision.encoder.",
    "connector": "connector.",
    "llm": "llm.",
    "grounding": "grounding.",
    "region": "region.",
}


def layout_for(name: str) -> Layout:
    if name not in FORMATS:
        raise CheckpointLayoutError(f"model.init.format {name!r}: this medpipe imports {', '.join(FORMATS)}")
    return FORMATS[name]


def _folder_config(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / "config.json"
    return read_config(path) if file.is_file() else None


def detect_format(path: str | Path) -> str | None:
    """The format whose layout a folder's ``config.json`` is (``moe_llava``, ``llava``); None for a plain
    checkpoint (or no config)."""
    config = _folder_config(path)
    if config is None:
        return None
    for name in DETECTION_ORDER:
        if FORMATS[name].llm_config_dict(config) is not None:
            return "hf_llava" if name == "llava" and config.get("model_type") == "llava" else name
    return None


def llm_config_dict(path: str | Path) -> dict[str, Any] | None:
    """The LLM's config inside a released multimodal folder (any layout of ``DETECTION_ORDER``) as a
    transformers config dict; None otherwise."""
    config = _folder_config(path)
    if config is None:
        return None
    for name in DETECTION_ORDER:
        found = FORMATS[name].llm_config_dict(config)
        if found is not None:
            return found
    return None


def vision_config_dict(path: str | Path) -> dict[str, Any] | None:
    """The vision tower's config inside a released folder that carries it (``hf_llava``); None otherwise."""
    config = _folder_config(path)
    if config is None:
        return None
    for name in DETECTION_ORDER:
        found = FORMATS[name].vision_config_dict(config)
        if found is not None:
            return found
    return None


def imported_parts(init: Any) -> set[str]:
    """The model parts ``model.init`` fills (e.g. ``llm``, ``connector``, and ``vision`` when the checkpoint
    carries the tower): the builder makes them without loading their own weights."""
    if init is None:
        return set()
    return layout_for(init.format).parts(checkpoint_keys(init.path))


def apply_import_structure(model: nn.Module, *, model_cfg: Any) -> int:
    """Apply the structure of ``model.init``'s checkpoint (e.g. its MoE layers) to ``model`` without reading
    weights (``medpipe params`` / ``memory``); a checkpoint not on disk changes nothing. Returns the number of
    entries applied."""
    init = model_cfg.get("init")
    path = None if init is None else Path(init.path)
    if path is None or not path.exists():
        return 0
    layout = layout_for(init.format)
    return _apply_structure(model, layout.structure(layout.read_config(path), checkpoint_keys(path), path))


def _apply_structure(model: nn.Module, entries: list[dict[str, Any]]) -> int:
    from pipeline.structure import apply_entry

    for entry in entries:
        apply_entry(model, entry)
    return len(entries)


def import_checkpoint(model: nn.Module, *, model_cfg: Any) -> ImportReport:
    """Load ``model_cfg.init``'s checkpoint into ``model`` (the freshly built ``MultimodalLM``) by its
    format's rules; raises :class:`CheckpointLayoutError` naming what does not fit."""
    init = model_cfg.init
    layout = layout_for(init.format)
    path = Path(init.path)
    config = layout.read_config(path)
    keys = checkpoint_keys(path)
    layout.check_settings(config, model_cfg, path, keys)
    _apply_structure(model, layout.structure(config, keys, path))  # the weights need the checkpoint's structure
    source = read_state_dict(path)
    targets = model.state_dict()
    tied = _tied_duplicates(model)
    views = layout.views(model, source, config)
    if views is not None:  # model keys filled from several source keys: the mapping sees the source's keys
        targets = {k: v for k, v in targets.items() if k not in views.replaced} | views.virtual
    prefixes = tuple(PART_PREFIXES[part] for part in sorted(layout.parts(keys)))
    extra = _views_required(views)  # e.g. both halves of each LoRA pair, outside the parts a checkpoint fills
    required = [k for k in targets if (k.startswith(prefixes) or k in extra) and k not in tied]
    report = ImportReport(source=str(path), layout=init.format)
    mapped = map_state_dict(source, layout.rules(config, model_cfg), targets=targets, required=required, report=report)
    for name in [n for n in mapped if n.endswith(VOCAB_SUFFIXES)]:
        mapped[name] = copy_vocab_rows(targets[name], mapped[name], name=name, report=report)
    if views is not None:
        mapped = views.assemble(mapped, report)
    model.load_state_dict(mapped, strict=False)
    log.info("model.init: %s", report.summary())
    for note in report.notes:
        log.info("model.init: %s", note)
    return report


def _views_required(views: moe_llava.TargetViews | None) -> set[str]:
    return set() if views is None else views.required


def _tied_duplicates(model: nn.Module) -> set[str]:
    """State-dict keys that share their tensor with an earlier key (tied embeddings): filled through it."""
    seen: dict[int, str] = {}
    duplicates = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if pointer in seen and tensor.numel():
            duplicates.add(name)
        else:
            seen[pointer] = name
    return duplicates
