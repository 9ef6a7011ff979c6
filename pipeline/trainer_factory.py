"""Lightning Trainer from the ``trainer`` section and one stage's schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from pipeline.strategies import build_strategy


def build_trainer(
    trainer_cfg: DictConfig,
    *,
    max_epochs: int = 1,
    max_steps: int = -1,
    logger: Any = False,
    callbacks: list | None = None,
    root_dir: str | Path = ".",
    enable_checkpointing: bool = False,
) -> L.Trainer:
    devices = trainer_cfg.devices
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=devices if devices is not None else "auto",
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(
            trainer_cfg.strategy, trainer_cfg.accelerator, world_size=trainer_cfg.num_nodes * _count(devices)
        ),
        precision=trainer_cfg.precision,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=trainer_cfg.accumulate_grad_batches,
        gradient_clip_val=trainer_cfg.gradient_clip_val,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        val_check_interval=trainer_cfg.val_check_interval,
        limit_val_batches=trainer_cfg.limit_val_batches,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        deterministic=trainer_cfg.deterministic,
        logger=logger,
        callbacks=callbacks or [],
        default_root_dir=str(root_dir),
        enable_checkpointing=enable_checkpointing,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _count(devices: Any) -> int:
    """How many devices per node ``trainer.devices`` names (1 for ``auto``: only ``fsdp2`` asks, and its
    config check requires a count)."""
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices != "auto":
        parts = [p for p in devices.split(",") if p.strip()]
        return len(parts) if len(parts) > 1 else max(int(parts[0]), 1)
    return 1
