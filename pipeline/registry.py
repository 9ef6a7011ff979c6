"""Load a model registered by a run in one call: ``load_registered("models:/medpipe-demo/1")``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

REGISTRY_SCHEMES = ("models:/", "runs:/")


def is_registry_uri(value: str | None) -> bool:
    return bool(value) and str(value).startswith(REGISTRY_SCHEMES)


def download_model(uri: str, *, tracking_uri: str, dst: str | Path | None = None) -> Path:
    """The registered ``model/`` folder (hand-over file and config) downloaded locally; a store or a model
    that cannot be read is one :class:`pipeline.tracking.TrackingError` line naming both."""
    import mlflow

    from pipeline.tracking import open_client, tracking_errors

    open_client(tracking_uri)  # a wrong URI, or a fresh sqlite store created under its lock
    mlflow.set_tracking_uri(tracking_uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="medpipe-model-"))
    with tracking_errors(tracking_uri, f"downloading {uri}"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    if registered_handover(local) is None:
        raise FileNotFoundError(
            f"{uri}: no handover.json in the registered model (found {sorted(p.name for p in local.iterdir())})"
        )
    return local


def registered_handover(folder: Path) -> Path | None:
    """The hand-over of a downloaded registered model: ``handover.json`` (its earlier links under
    ``previous/``), or ``handover.pt`` for a version registered before hand-overs became deltas."""
    for name in ("handover.json", "handover.pt"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_folder(folder: str | Path, overrides: list[str] | None = None) -> tuple[Any, Any]:
    """(config, ``BuiltModel``) of a downloaded registered model folder: its config, the base checkpoints it
    names, the hand-over chain, and the last stage's conversation preset (the prompts its evaluation used)."""
    from pipeline.config import load_config
    from pipeline.handover import base_of, restore
    from pipeline.model_factory import build_model

    folder = Path(folder)
    handover = registered_handover(folder)
    if handover is None or not (folder / "config.yaml").is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(f"{folder}: not a registered medpipe model (config.yaml and hand-over; found {found})")
    cfg = load_config(folder / "config.yaml", overrides or [], check_paths=False)
    last = list(cfg.stages)[-1] if cfg.stages else None
    built = build_model(
        cfg.model, cache_dir=cfg.cache_dir, conversation=cfg.stages[last].conversation if last else None
    )
    restore(built.model, handover, base=base_of(cfg.model))
    return cfg, built


def load_registered(uri: str, *, tracking_uri: str, overrides: list[str] | None = None) -> Any:
    """``BuiltModel`` (model, tokenizer, transform) rebuilt from the registered config and weights."""
    return load_folder(download_model(uri, tracking_uri=tracking_uri), overrides)[1]
