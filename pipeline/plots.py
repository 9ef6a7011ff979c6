"""Figures logged to MLflow: learning curves (other plots live beside the code that owns the data)."""

from __future__ import annotations

from typing import Any


def learning_curve(losses: list[float], val_losses: list[float], *, title: str) -> Any:
    """Training loss per optimiser step and validation loss per validation run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="train loss")
    if val_losses and losses:
        every = len(losses) / len(val_losses)
        ax.plot([every * (i + 1) for i in range(len(val_losses))], val_losses, "o-", label="val loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
