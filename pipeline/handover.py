"""Weights handed from one stage to the next (and to evaluation): one file per stage.

The file holds the full model state dict with LoRA merged in, plus what built it, and loads with
``torch.load(weights_only=True)``: no code runs from a checkpoint. ``meta["structure"]`` lists the
structural changes stages made (modality classifier, MoE layers; ``pipeline/structure.py``);
``restore`` replays them on the freshly built model before loading the weights.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.safe_load import check_handover, load_weights
from pipeline.structure import apply_structure, model_structure

FORMAT_VERSION = 1


class HandoverWriteError(OSError):
    """A hand-over file could not be written (full disk, quota, I/O error); no partial file is left."""


def save_handover(model: nn.Module, path: str | Path, *, stage: str, meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {**(meta or {}), "structure": model_structure(model)}
    # distributed: the ranks hold identical weights; one process per node writes (node-local disks work,
    # and on a shared filesystem each node's temporary file has its own name), then every rank waits so
    # nobody reads the file (next stage, evaluation) before it is complete
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        node = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", "0")))
        tmp = path.with_suffix(f".tmp{node}")
        save_atomically({"format": FORMAT_VERSION, "stage": stage, "meta": meta, "state_dict": state}, path, tmp)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def save_atomically(data: dict[str, Any], path: Path, tmp: Path) -> None:
    """``torch.save`` to ``tmp`` (beside ``path``), renamed over ``path`` once complete: never a half-written
    hand-over. On any failure ``tmp`` is removed; a write failure is one line naming ``path``."""
    try:
        with open(tmp, "wb") as f:  # a Python file: a failing write raises OSError with its errno
            torch.save(data, f)
        tmp.replace(path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        torch_writer = isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_FAILURES)
        if isinstance(e, OSError) or torch_writer:
            raise HandoverWriteError(write_failure(path, e)) from None
        raise


# how torch's own zip writer reports a short write (a full disk): "[enforce fail at inline_container.cc:672] .
# unexpected pos 704 vs 598", "PytorchStreamWriter failed writing file data/0: file write failed"
TORCH_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed")


def write_failure(path: Path, error: BaseException) -> str:
    """One line for a failed hand-over write: the file, the reason (an OSError's own, ``no space left on
    device`` for torch's writer) and the free space left."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    if isinstance(error, OSError) and error.errno is not None:
        reason = (error.strerror or os.strerror(error.errno)).lower()
    elif isinstance(error, OSError):
        reason = str(error)
    else:
        reason = os.strerror(errno.ENOSPC).lower()  # "no space left on device"
    return f"{path}: writing the hand-over failed: {reason} ({free}); the partial file was removed"


def load_handover(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over checkpoint not found")
    return check_handover(load_weights(path), path, FORMAT_VERSION)  # any failure: one line naming the file


def handover_structure(path: str | Path) -> list[dict[str, Any]]:
    """The structure entries a hand-over records, without reading its weights (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over checkpoint not found")
    data = check_handover(load_weights(path, mmap=True), path, FORMAT_VERSION)
    return list(data["meta"].get("structure", []))


def restore(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a hand-over into ``model``; a missing or unexpected key is an error naming it."""
    data = load_handover(path)
    apply_structure(model, data["meta"].get("structure", []), source=str(path))
    own = model.state_dict()
    for key, value in data["state_dict"].items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{path}: weights do not fit the model built from the config: {key} has shape "
                f"{tuple(value.shape)} in the file and {tuple(own[key].shape)} in the model"
            )
    result = model.load_state_dict(data["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the model built from the config: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return data
