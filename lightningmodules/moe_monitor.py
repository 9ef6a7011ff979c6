"""What the stage LightningModule needs from the LLM's MoE layers: the padding mask in, aux loss and loads out.

HF decoder layers call ``mlp(hidden_states)`` without a mask, so before each forward the batch's
attention mask is stored on every MoE layer (``set_token_mask``); it stays set until the next batch so
gradient-checkpointed layers that re-run during backward see it too, and is cleared before generation
(KV-cache steps have other shapes). After a training forward: the weighted aux losses (load balancing
with padding masked out, z-loss), per-layer expert load and dropped assignments as step metrics, and
assignment counts per (modality, expert) accumulated for the epoch.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lightningmodules.models.moe import (
    MoEFeedForward,
    clear_token_mask,
    collect_aux_loss,
    expert_load_by_group,
    moe_layers,
    set_token_mask,
)

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.mlp$")


def layer_label(name: str) -> str:
    """``llm.model.layers.4.mlp`` -> ``layer4`` (the qualified name when there is no index)."""
    match = _LAYER_INDEX.search(name)
    return f"layer{match.group(1)}" if match else name


class MoEMonitor:
    """Token mask, aux loss and routing statistics of the MoE layers of ``model`` (none: every call is a no-op)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[tuple[str, MoEFeedForward]] = [(layer_label(n), m) for n, m in moe_layers(model)]
        self.modalities: list[str] = []  # group index -> modality name, in order of first appearance
        self.load_by_modality: dict[str, torch.Tensor] = {}  # layer -> (G, E) long assignment counts
        self.dropped_total = 0

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def begin(self, attention_mask: torch.Tensor) -> None:
        """Route only real tokens of this batch (call before the forward)."""
        if self.enabled:
            set_token_mask(self.model, attention_mask)

    def end(self) -> None:
        """Forget the mask (before generation)."""
        if self.enabled:
            clear_token_mask(self.model)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over layers of ``load_balance_coef * switch + z_loss_coef * z`` of the last forward."""
        return collect_aux_loss(self.model) if self.enabled else None

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
        """Per-layer expert load (fraction of assignments), dropped assignments and raw aux losses of the last
        forward; with ``records`` also accumulates the per-modality counts."""
        if not self.enabled:
            return {}
        metrics: dict[str, float] = {}
        dropped = 0
        balance, z_loss = [], []
        for label, layer in self.layers:
            stats = layer.last_stats
            if stats is None:
                continue
            for e, fraction in enumerate(stats.load.tolist()):
                metrics[f"moe/{label}/load_expert{e}"] = fraction
            metrics[f"moe/{label}/dropped"] = float(stats.dropped)
            dropped += stats.dropped
            balance.append(float(stats.load_balancing_loss))
            z_loss.append(float(stats.z_loss))
            record = layer.last_routing
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
