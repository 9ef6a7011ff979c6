"""Mid-stage checkpoints that a killed run resumes from exactly.

Three pieces make "kill at any step, resume, same result" hold:

- :class:`StageCheckpoint` writes ``last.ckpt`` every N optimiser steps (or every epoch) through a
  temporary file and an atomic rename, so a kill during the write leaves the previous checkpoint
  intact; after each save it tells the loggers, which flush the metrics they held back
  (:class:`pipeline.tracking.BufferedMLFlowLogger`): MLflow never holds a step the checkpoint lacks.
- :class:`DataPosition` makes the train sampler skip the batches of the current epoch that the
  checkpoint already consumed (Lightning restores its loop counters but restarts the loader).
- :class:`RngState` stores the torch / numpy / python RNG states in the checkpoint and puts them back
  right before the first resumed batch (after the loader iterator, which draws from torch's RNG,
  was created), so dropout masks match the uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("medpipe")

LAST = "last.ckpt"

# DataPosition makes the loader resumable by skipping in the sampler; Lightning cannot see that
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


class StageCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_steps`` optimiser steps (None: at every epoch end)."""

    def __init__(self, dirpath: str | Path, *, every_n_steps: int | None) -> None:
        super().__init__(
            dirpath=str(dirpath),
            filename="last",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_steps,
            every_n_epochs=None if every_n_steps else 1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        trainer.save_checkpoint(tmp, self.save_weights_only)  # collective under DDP / FSDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, filepath)  # atomic: a kill mid-write keeps the previous last.ckpt
        trainer.strategy.barrier("medpipe-checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)  # flushes the metrics held back until now


def last_checkpoint(directory: str | Path) -> Path | None:
    path = Path(directory) / LAST
    return path if path.is_file() else None


def _train_sampler(trainer: L.Trainer) -> Any:
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    sampler = getattr(loader, "sampler", None)
    return sampler if hasattr(sampler, "skip_samples") else None


class DataPosition(L.Callback):
    """On a mid-epoch resume, skip the samples the restored epoch already consumed."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        batches = trainer.num_training_batches
        if not progress.processed or not isinstance(batches, int) or progress.processed % batches == 0:
            return  # fresh start, or the checkpoint closed an epoch: the next epoch starts from its beginning
        done = progress.processed % batches
        sampler = _train_sampler(trainer)
        if sampler is None:
            raise RuntimeError(
                "resuming mid-epoch needs the train loader's MixtureSampler (skip_samples); "
                f"got {type(getattr(trainer.train_dataloader, 'sampler', None)).__name__}"
            )
        batch_size = trainer.train_dataloader.batch_size
        sampler.skip_samples = done * batch_size
        log.info("resuming epoch %d at batch %d of %d", trainer.current_epoch, done, batches)


def _rng_states() -> dict[str, Any]:
    # plain lists and ints: the checkpoint must load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def _set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RngState(L.Callback):
    """RNG states in the checkpoint, restored just before the first resumed training batch."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return _rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            _set_rng_states(self._pending)
            self._pending = None
