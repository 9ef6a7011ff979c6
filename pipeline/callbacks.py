"""Small Lightning callbacks the runner attaches to every stage."""

from __future__ import annotations

from typing import Any

import lightning as L


class LossHistory(L.Callback):
    """Keeps the training loss of every optimiser step and its mean over each epoch (for the results table and
    the learning tests: an epoch covers the whole training split once, so its mean is free of the batch-to-batch
    noise that single steps carry)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.val_losses: list[float] = []
        self._epoch_start = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fit_loop.epoch_loop.batch_progress.current.ready:  # not an epoch resumed mid-way
            self._epoch_start = len(self.losses)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = self.losses[self._epoch_start :]
        if epoch:
            self.epoch_losses.append(sum(epoch) / len(epoch))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking:
            self.val_losses.append(float(value))

    # kept in checkpoints, so a resumed stage's learning curve and results table cover every step
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "epoch_losses": list(self.epoch_losses),
            "val_losses": list(self.val_losses),
            "epoch_start": self._epoch_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = list(state_dict["losses"])
        self.epoch_losses = list(state_dict.get("epoch_losses", []))
        self.val_losses = list(state_dict["val_losses"])
        self._epoch_start = int(state_dict.get("epoch_start", len(self.losses)))

    def mean(self, part: str, fraction: float = 0.1) -> float:
        """Mean loss over the first or last ``fraction`` of the steps."""
        if not self.losses:
            return float("nan")
        n = max(1, int(len(self.losses) * fraction))
        window = self.losses[:n] if part == "first" else self.losses[-n:]
        return sum(window) / len(window)


class RoutingHeatmap(L.Callback):
    """After each validation run, the module's task x expert routing table as a heatmap artifact.

    ``plots/routing/epoch_<NNN>.png`` per validation run and ``plots/routing_heatmap.png`` (the latest),
    through the tracker (rank 0 only). The scalars are logged by the module itself.
    """

    def __init__(self, *, tracker: Any, run_id: str | None, task_names: list[str], title: str = "routing") -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.task_names = task_names
        self.title = title
        self.figures = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        table = getattr(pl_module, "routing_table", None)
        if (
            table is None
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or self.run_id is None
            or not getattr(self.tracker, "enabled", False)
        ):
            return
        import matplotlib.pyplot as plt

        from pipeline.plots import routing_heatmap

        figure = routing_heatmap(
            table.numpy(), self.task_names, title=f"{self.title}: mean routing weight, epoch {trainer.current_epoch}"
        )
        self.tracker.log_figure(self.run_id, figure, f"plots/routing/epoch_{trainer.current_epoch:03d}.png")
        self.tracker.log_figure(self.run_id, figure, "plots/routing_heatmap.png")
        plt.close(figure)
        self.figures += 1
