"""Reading a torch file (a format-1 ``handover.pt``, a Lightning checkpoint): ``torch.load(weights_only=True)``,
every failure one line naming the file. Hand-overs are now safetensors deltas (``pipeline/handover.py``).

A hand-over reaches ``torch.load`` from the user (``medpipe evaluate ckpt=...``, ``init_from``, a registry
download), so anything may be in it: a text file (torch's legacy reader fails with ``KeyError: 101``), an
empty or truncated file (``EOFError``, a miniz error), a pickle holding code (the weights-only unpickler's
page-long refusal). Each becomes a :class:`NotAHandoverError` saying what the file is, in one line. Nothing
is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any


class NotAHandoverError(ValueError):
    """A file given as a hand-over is not one (unreadable, corrupt, refused, or the wrong content)."""


def _what_failed(path: Path, error: BaseException) -> str:
    message = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return (
            f"it holds a Python object ({refused.group(1)}), which torch.load(weights_only=True) refuses: "
            "medpipe never runs code from a checkpoint"
        )
    if "PytorchStreamReader" in message or "zip archive" in message:
        return "a corrupt or truncated torch file (its zip archive cannot be read)"
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    if not head:
        return "the file is empty"
    if head.startswith(b"\x80"):  # a pickle stream (or torch's legacy, pre-zip format)
        return "a plain pickle, not a torch.save zip file of tensors (the only kind medpipe reads)"
    return f"not a torch file (it starts with {head!r})"


def load_weights(path: str | Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a file it cannot read or refuses is a
    :class:`NotAHandoverError` naming ``path`` (OS errors, e.g. permission denied, stay what they are)."""
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*pickle protocol.*")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # UnpicklingError, KeyError, EOFError, RuntimeError, ValueError (mmap), ...
        raise NotAHandoverError(f"{path}: not a medpipe hand-over checkpoint: {_what_failed(path, e)}") from None


def check_handover(data: Any, path: str | Path, format_version: int) -> dict[str, Any]:
    """``data`` is a hand-over: a dict with ``format``, a ``state_dict`` of named tensors and a ``meta`` dict
    (its ``structure`` a list of entries); else a :class:`NotAHandoverError` naming the file and the field."""
    import torch

    def wrong(field: str, reason: str) -> NotAHandoverError:
        return NotAHandoverError(f"{path}: not a medpipe hand-over checkpoint: field '{field}': {reason}")

    if not isinstance(data, dict):
        raise NotAHandoverError(
            f"{path}: not a medpipe hand-over checkpoint (format {format_version}): it holds a {type(data).__name__}"
        )
    if data.get("format") != format_version:
        raise wrong("format", f"expected {format_version}, got {data.get('format')!r}")
    state = data.get("state_dict")
    if not isinstance(state, dict):
        raise wrong("state_dict", f"expected a dict of tensors, got {type(state).__name__}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise wrong(f"state_dict.{bad}", f"expected a tensor, got {type(state[bad]).__name__}")
    meta = data.setdefault("meta", {})
    if not isinstance(meta, dict):
        raise wrong("meta", f"expected a dict, got {type(meta).__name__}")
    structure = meta.get("structure", [])
    if not isinstance(structure, list) or not all(isinstance(entry, dict) for entry in structure):
        raise wrong("meta.structure", "expected a list of structure entries (dicts)")
    return data
