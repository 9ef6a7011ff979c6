"""Start from a released checkpoint: its weights, mapped strictly into the model ``model:`` builds.

``model.init: {format, path}`` (``IMPORT_FORMATS``): the builder makes the parts the checkpoint fills from
their configs only (no second load of the same weights), then :func:`import_checkpoint` maps every source
key by the format's rules (``keymap.py``: every source key used or left out with a reason, every target key
filled, shapes equal) and loads them. Formats: ``llava`` (LLaVA-1.5 / LLaVA-Med v1.5, the original layout)
and ``hf_llava`` (transformers' ``LlavaForConditionalGeneration``), ``llava.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.importers import llava
from pipeline.importers.checkpoints import checkpoint_keys, read_config, read_state_dict
from pipeline.importers.keymap import (
    VOCAB_SUFFIXES,
    CheckpointLayoutError,
    ImportReport,
    copy_vocab_rows,
    map_state_dict,
)

log = logging.getLogger("medpipe")

__all__ = [
    "CheckpointLayoutError",
    "ImportReport",
    "import_checkpoint",
    "imported_parts",
    "llm_config_dict",
    "vision_config_dict",
]


def llm_config_dict(path: str | Path) -> dict[str, Any] | None:
    """The LLM's config inside a LLaVA folder (either layout) as a transformers config dict; None otherwise."""
    file = Path(path) / "config.json"
    return llava.llm_config_dict(read_config(path)) if file.is_file() else None


def vision_config_dict(path: str | Path) -> dict[str, Any] | None:
    """The vision tower's config inside an ``hf_llava`` folder; None otherwise."""
    file = Path(path) / "config.json"
    return llava.vision_config_dict(read_config(path)) if file.is_file() else None


def imported_parts(init: Any) -> set[str]:
    """The model parts ``model.init`` fills (``llm``, ``connector``, and ``vision`` when the checkpoint
    carries the tower): the builder makes them without loading their own weights."""
    if init is None:
        return set()
    parts = {"llm", "connector"}
    if llava.has_vision_weights(init.format, checkpoint_keys(init.path)):
        parts.add("vision")
    return parts


def import_checkpoint(model: nn.Module, *, model_cfg: Any) -> ImportReport:
    """Load ``model_cfg.init``'s checkpoint into ``model`` (the freshly built ``MultimodalLM``) by its
    format's rules; raises :class:`CheckpointLayoutError` naming what does not fit."""
    init = model_cfg.init
    path = Path(init.path)
    config = read_config(path)
    llava.check_settings(init.format, config, model_cfg, path)
    source = read_state_dict(path)
    targets = model.state_dict()
    parts = imported_parts(init)
    prefixes = tuple(f"{part}." if part != "vision" else "vision.encoder." for part in sorted(parts))
    tied = _tied_duplicates(model)
    required = [k for k in targets if k.startswith(prefixes) and k not in tied]
    report = ImportReport(source=str(path), layout=init.format)
    mapped = map_state_dict(source, llava.rules_for(init.format), targets=targets, required=required, report=report)
    for name in [n for n in mapped if n.endswith(VOCAB_SUFFIXES)]:
        mapped[name] = copy_vocab_rows(targets[name], mapped[name], name=name, report=report)
    model.load_state_dict(mapped, strict=False)
    log.info("model.init: %s", report.summary())
    for note in report.notes:
        log.info("model.init: %s", note)
    return report


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
