"""Model path prefixes and the cache folder: what a ``model.*.path`` may name, readable without torch."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TIMM_PREFIX", "TINY_PREFIX", "default_cache_dir", "is_timm_path", "tiny_name"]

TINY_PREFIX = "tiny:"  # tiny:<name>: a tiny model built on first use (pipeline/zoo)
TIMM_PREFIX = "timm:"  # timm:<model name>: a timm vision tower, weights from model.vision.checkpoint


def tiny_name(path: str) -> str | None:
    """``"tiny:llama"`` -> ``"llama"``; None for any other path."""
    path = str(path)
    return path.removeprefix(TINY_PREFIX) if path.startswith(TINY_PREFIX) else None


def is_timm_path(path: str) -> bool:
    return str(path).startswith(TIMM_PREFIX)


def default_cache_dir() -> Path:
    """Where tiny models are built: ``$MEDPIPE_CACHE``, else ``~/.cache/medpipe``."""
    return Path(os.environ.get("MEDPIPE_CACHE", Path.home() / ".cache" / "medpipe"))
