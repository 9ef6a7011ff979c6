"""Weights handed from one stage to the next (and to evaluation): one file per stage.

The file holds the full model state dict with LoRA merged in, plus what built it, and loads with
``torch.load(weights_only=True)``: no code runs from a checkpoint. ``meta["structure"]`` lists the
structural changes stages made (modality classifier, MoE layers; ``pipeline/structure.py``);
``restore`` replays them on the freshly built model before loading the weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.structure import apply_structure, model_structure

FORMAT_VERSION = 1


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
        torch.save({"format": FORMAT_VERSION, "stage": stage, "meta": meta, "state_dict": state}, tmp)
        tmp.replace(path)  # never leave a half-written hand-over behind
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def load_handover(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over checkpoint not found")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or "state_dict" not in data:
        raise ValueError(f"{path}: not a medpipe hand-over checkpoint (format {FORMAT_VERSION})")
    return data


def handover_structure(path: str | Path) -> list[dict[str, Any]]:
    """The structure entries a hand-over records, without reading its weights (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over checkpoint not found")
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return list(data.get("meta", {}).get("structure", [])) if isinstance(data, dict) else []


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
