"""Small Lightning callbacks the runner attaches to every stage."""

from __future__ import annotations

from typing import Any

import lightning as L


class LossHistory(L.Callback):
    """Keeps the training loss of every optimiser step (for the results table and learning tests)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking:
            self.val_losses.append(float(value))

    def mean(self, part: str, fraction: float = 0.1) -> float:
        """Mean loss over the first or last ``fraction`` of the steps."""
        if not self.losses:
            return float("nan")
        n = max(1, int(len(self.losses) * fraction))
        window = self.losses[:n] if part == "first" else self.losses[-n:]
        return sum(window) / len(window)
