"""Read a released checkpoint folder's weights and config without running any of its code.

Weights: ``*.safetensors`` (sharded or not), else ``pytorch_model*.bin`` / ``*.pth`` / ``*.pt`` through
``torch.load(weights_only=True)`` (tensors and plain containers only: a pickle that needs code is refused).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.importers.keymap import CheckpointLayoutError

TORCH_SUFFIXES = (".bin", ".pth", ".pt")


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a folder (or the file itself): safetensors first, else torch files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointLayoutError(f"{path}: no such checkpoint folder or file")
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if not torch_files:
        raise CheckpointLayoutError(f"{path}: no weights (*.safetensors, pytorch_model*.bin, *.pth)")
    return torch_files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by key; a key in two shards is an error naming both files."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in checkpoint_files(path):
        try:
            if file.suffix == ".safetensors":
                part = load_file(str(file))
            else:
                part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any reader failure is this file's problem, in one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointLayoutError(f"{file}: cannot read the weights: {first}") from None
        if isinstance(part, dict) and "state_dict" in part and isinstance(part["state_dict"], dict):
            part = part["state_dict"]  # a training checkpoint's wrapper
        if isinstance(part, dict) and "model" in part and isinstance(part["model"], dict):  # MiniGPT-style .pth
            part = part["model"]
        if not isinstance(part, dict):
            raise CheckpointLayoutError(f"{file}: expected a dict of tensors, got {type(part).__name__}")
        for key, tensor in part.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointLayoutError(f"{file}: key {key!r} is a {type(tensor).__name__}, not a tensor")
            if key in state:
                raise CheckpointLayoutError(f"{file}: key {key!r} is also in {origin[key]}")
            state[key] = tensor
            origin[key] = file
    return state


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict (an error naming the file when absent or not JSON)."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointLayoutError(f"{file}: missing (a released checkpoint folder has its config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointLayoutError(f"{file}: not a JSON config: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointLayoutError(f"{file}: expected a JSON object")
    return config


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor keys of a checkpoint without reading the tensors (safetensors headers; torch files mmap'd)."""
    from safetensors import safe_open

    keys: list[str] = []
    files = checkpoint_files(path)
    if files[0].suffix != ".safetensors":
        return list(read_state_dict(path))
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys += list(handle.keys())
    return keys
