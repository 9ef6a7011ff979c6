"""Figures logged to MLflow: learning curves (other plots live beside the code that owns the data)."""

from __future__ import annotations

import re
from pathlib import Path
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


def confusion_matrix_figure(matrix: list[list[int]], labels: list[str], *, title: str) -> Any:
    """Counts per (true, predicted) class as a heatmap with the numbers written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.0 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def routing_heatmap(table: Any, task_names: list[str], *, title: str) -> Any:
    """Task x expert heatmap of mean routing weights ((tasks, E) array); tasks without images are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(table, dtype=float)  # (tasks, E)
    rows = [t for t in range(values.shape[0]) if not np.isnan(values[t]).any()]
    values = values[rows]  # (tasks with images, E)
    labels = [task_names[t] if t < len(task_names) else f"task{t}" for t in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * values.shape[1], 1.0 + 0.45 * max(1, len(rows))))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(values.max(initial=0.0))), aspect="auto")
    ax.set_xticks(range(values.shape[1]), [f"expert {e}" for e in range(values.shape[1])], rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for (i, j), w in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{w:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if w < 0.6 * values.max(initial=1.0) else "black",
        )
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean routing weight")
    fig.tight_layout()
    return fig


def expert_load_shares(summary: dict[str, Any]) -> tuple[list[str], Any]:
    """Layer labels and the (layers, E) share of each layer's token assignments per expert, all modalities
    together, from an LLM-MoE stage's ``moe/expert_load.json`` (``MoEMonitor.summary``); a layer without
    recorded assignments is a row of NaN."""
    import numpy as np

    layers = list(summary.get("layers", {}))
    width = max((int(entry["experts"]) for entry in summary["layers"].values()), default=0)
    shares = np.full((len(layers), width), np.nan)  # (layers, E)
    for i, label in enumerate(layers):
        rows = list(summary["layers"][label].get("by_modality", {}).values())
        counts = np.asarray(rows, dtype=float).sum(axis=0) if rows else np.zeros(0)  # (E,)
        if counts.size and counts.sum() > 0:
            shares[i, : counts.size] = counts / counts.sum()
    return layers, shares


def expert_load_heatmap(summary: dict[str, Any], *, title: str) -> Any:
    """Layer x expert heatmap of the share of token assignments (``expert_load_shares``), numbers written in;
    the even share 1 / E is the colour scale's middle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, shares = expert_load_shares(summary)  # (layers, E)
    experts = shares.shape[1]
    fig, ax = plt.subplots(figsize=(3.5 + 0.9 * max(1, experts), 2.2 + 0.4 * max(1, len(layers))))
    even = 1.0 / experts if experts else 0.5
    image = ax.imshow(shares, cmap="coolwarm", vmin=0.0, vmax=min(1.0, 2 * even), aspect="auto")
    ax.set_xticks(range(experts), [f"expert {e}" for e in range(experts)], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    for (i, j), share in np.ndenumerate(shares):
        ax.text(j, i, "-" if np.isnan(share) else f"{share:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"expert (an even load: {even:.2f} each)")
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    return fig


def similarity_figure(matrix: Any, labels: list[str], *, title: str) -> Any:
    """Symmetric (n, n) similarity in [-1, 1] (e.g. gradient cosine between tasks), numbers written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(matrix, dtype=float)  # (n, n)
    size = 1.5 + 0.8 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(values, cmap="RdBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def draw_overlay(record: Any, pred: Any, target: Any, out_dir: Path) -> Path:
    """The record's image in grey with the target mask in green and the predicted one in red (overlap yellow),
    written as ``<out_dir>/<record id>.png``; masks are (H, W) bool tensors, ``pred`` None = no prediction."""
    import numpy as np
    from PIL import Image

    from datamodules.images import load_image

    image = np.asarray(
        load_image(record.image_path, record.image_bytes, record=record.id).convert("L"), dtype=np.float32
    )  # (H, W)
    rgb = np.repeat(image[..., None] * 0.6, 3, axis=-1)  # (H, W, 3)
    truth = target.numpy().astype(bool)  # (H, W)
    rgb[..., 1] = np.where(truth, 255.0, rgb[..., 1])
    if pred is not None:
        rgb[..., 0] = np.where(pred.numpy().astype(bool), 255.0, rgb[..., 0])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', record.id)}.png"
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
    return path
