"""The one routing monitor of a stage LightningModule: opens the step's ``MoEContext``, reads it back.

Before each forward ``begin`` opens a fresh ``MoEContext`` with the batch's (B, T) attention mask and
attaches it to every MoE part of the model (the LLM's ``MoEFeedForward`` layers and a CMoE connector); it
stays attached until the next batch so gradient-checkpointed layers that re-run during backward see it
too, and is detached before generation (``end``: KV-cache steps have other shapes, every token is routed).
From the context: the weighted aux losses (load balancing with padding masked out, z-loss), per-layer
expert load and dropped assignments as step metrics, assignment counts per (modality, expert) for the
epoch (``moe/expert_load.json``), and the connector's per-task mean routing weights over each validation
epoch (``routing/<task>/expert_<e>``, the routing heatmap).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lightningmodules.metrics.routing import RoutingByTask
from lightningmodules.models.cmoe import CMoEConnector
from lightningmodules.models.moe import (
    MoEContext,
    MoEFeedForward,
    UsesMoEContext,
    attach_context,
    context_users,
    expert_load_by_group,
)

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.mlp$")


def layer_label(name: str) -> str:
    """``llm.model.layers.4.mlp`` -> ``layer4`` (the qualified name when there is no index)."""
    match = _LAYER_INDEX.search(name)
    return f"layer{match.group(1)}" if match else name


class MoEMonitor(nn.Module):
    """Context, aux loss and routing statistics of the MoE parts of ``model`` (none: every call is a no-op).

    An ``nn.Module`` only so that the per-task routing metric (``by_task``) moves with the LightningModule
    and syncs across ranks; the model's parts are held in plain lists, not registered (no second copy of
    their parameters in the state dict).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        parts = context_users(model)
        self.parts: list[UsesMoEContext] = [part for _, part in parts]
        self.layers: list[tuple[str, MoEFeedForward]] = [
            (layer_label(name), part) for name, part in parts if isinstance(part, MoEFeedForward)
        ]
        connectors = [part for part in self.parts if isinstance(part, CMoEConnector)]
        self.connectors: list[CMoEConnector] = connectors
        self.by_task = (
            RoutingByTask(num_tasks=connectors[0].num_tasks, num_experts=connectors[0].num_experts)
            if connectors
            else None
        )
        self.context: MoEContext | None = None  # the current step's, None before the first / after ``end``
        self.modalities: list[str] = []  # group index -> modality name, in order of first appearance
        self.load_by_modality: dict[str, torch.Tensor] = {}  # layer -> (G, E) long assignment counts
        self.dropped_total = 0

    def __getstate__(self) -> dict:
        """Pickle / deepcopy without the step's context (its aux losses are non-leaf graph tensors)."""
        state = self.__dict__.copy()
        state["context"] = None
        return state

    @property
    def enabled(self) -> bool:
        """Whether the LLM has MoE layers (aux losses, loads, the expert-load artifact)."""
        return bool(self.layers)

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Open this step's context: route only real tokens of this batch (call before the forward)."""
        if self.parts:
            self.context = MoEContext(attention_mask)
            attach_context(self.parts, self.context)

    def end(self) -> None:
        """Detach the context (before generation): every token is routed, nothing is recorded."""
        if self.parts:
            self.context = None
            attach_context(self.parts, None)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over layers of ``load_balance_coef * switch + z_loss_coef * z`` of this step's forward."""
        return self.context.aux_loss() if self.enabled and self.context is not None else None

    def update_by_task(self) -> None:
        """Add this step's connector routing (images with task ids) to the per-task means of the epoch.

        A batch that did not run the connector (text only) recorded nothing in its fresh context.
        """
        if self.by_task is None or self.context is None:
            return
        record = self.context.routing.get(self.connectors[0])
        if record is not None and record.group_ids is not None:
            self.by_task.update(record.dense_weights(), record.group_ids)

    def _modality_ids(self, records: list[Any] | None, batch_size: int) -> torch.Tensor | None:
        if records is None or len(records) != batch_size:
            return None
        ids = []
        for record in records:
            name = getattr(record, "modality", None) or "unknown"
            if name not in self.modalities:
                self.modalities.append(name)
            ids.append(self.modalities.index(name))
        return torch.tensor(ids, dtype=torch.long)  # (B,)

    def step_metrics(self, records: list[Any] | None = None) -> dict[str, float]:
        """Per-layer expert load (fraction of assignments), dropped assignments and raw aux losses of this
        step's forward; with ``records`` also accumulates the per-modality counts."""
        if not self.enabled or self.context is None:
            return {}
        metrics: dict[str, float] = {}
        dropped = 0
        balance, z_loss = [], []
        for label, layer in self.layers:
            stats = self.context.stats.get(layer)
            if stats is None:
                continue
            for e, fraction in enumerate(stats.load.tolist()):
                metrics[f"moe/{label}/load_expert{e}"] = fraction
            metrics[f"moe/{label}/dropped"] = float(stats.dropped)
            dropped += stats.dropped
            balance.append(float(stats.load_balancing_loss))
            z_loss.append(float(stats.z_loss))
            record = self.context.routing.get(layer)
            group_ids = self._modality_ids(records, record.indices.shape[0]) if record is not None else None
            if group_ids is not None:
                counts = expert_load_by_group(
                    record, group_ids, num_groups=len(self.modalities), num_experts=layer.num_experts
                ).cpu()  # (G, E)
                previous = self.load_by_modality.get(label)
                if previous is not None and previous.shape[0] < counts.shape[0]:
                    grown = previous.new_zeros(counts.shape)  # (G, E) a new modality appeared
                    grown[: previous.shape[0]] = previous
                    previous = grown
                self.load_by_modality[label] = counts if previous is None else previous + counts
        self.dropped_total += dropped
        metrics["moe/dropped"] = float(dropped)
        if balance:
            metrics["moe/load_balancing_loss"] = sum(balance) / len(balance)
            metrics["moe/z_loss"] = sum(z_loss) / len(z_loss)
        return metrics

    def modality_metrics(self) -> dict[str, float]:
        """Accumulated load fractions ``moe/<layer>/<modality>/expert<e>`` (each modality's row sums to 1)."""
        metrics = {}
        for label, counts in self.load_by_modality.items():
            for g, row in enumerate(counts):
                total = int(row.sum())
                if total == 0:
                    continue
                for e, count in enumerate(row.tolist()):
                    name = re.sub(r"[^0-9A-Za-z_\-./ ]", "_", self.modalities[g])
                    metrics[f"moe/{label}/{name}/expert{e}"] = count / total
        return metrics

    def summary(self) -> dict[str, Any]:
        """JSON-able counts per layer and modality (the expert-load artifact)."""
        return {
            "modalities": list(self.modalities),
            "dropped_total": self.dropped_total,
            "layers": {
                label: {
                    "experts": layer.num_experts,
                    "top_k": layer.top_k,
                    "by_modality": {
                        self.modalities[g]: row.tolist() for g, row in enumerate(self.load_by_modality.get(label, []))
                    },
                }
                for label, layer in self.layers
            },
        }
