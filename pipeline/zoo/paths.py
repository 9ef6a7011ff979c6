"""Model paths to checkpoint directories: what the model builders call before ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from medcore.paths import tiny_name
from pipeline.zoo.cache import ensure_tiny


def resolve_model_path(path: str, cache_dir: str | Path | None = None) -> Path:
    """A checkpoint directory: ``tiny:<name>`` is built on first use, anything else is a path."""
    name = tiny_name(path)
    if name is not None:
        return ensure_tiny(name, cache_dir)
    return Path(path).expanduser()
