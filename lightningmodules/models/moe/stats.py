"""What an MoE layer did in its last forward: counts, drops, aux losses and per-token expert choices."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEStats:
    """Per-layer routing statistics of the last forward (all tensors detached)."""

    routed_counts: torch.Tensor  # (E,) long, assignments per expert over all k, padding excluded
    kept_counts: torch.Tensor  # (E,) long, assignments computed (routed minus capacity drops)
    num_tokens: int  # real (non-padding) tokens routed
    dropped: int  # assignments dropped by the capacity limit (0 when dropless)
    capacity: int | None  # per-expert limit, None = dropless
    load_balancing_loss: torch.Tensor  # () float, before its coefficient
    z_loss: torch.Tensor  # () float, before its coefficient

    @property
    def load(self) -> torch.Tensor:
        """Fraction of the routed assignments each expert received, (E,); sums to 1."""
        total = self.routed_counts.sum().clamp(min=1)
        return self.routed_counts.float() / total


@dataclass
class RoutingRecord:
    """Per-token expert choices of the last forward, shaped like the layer input's leading dims."""

    indices: torch.Tensor  # (B, T, k) long chosen experts
    weights: torch.Tensor  # (B, T, k) float combine weights
    token_mask: torch.Tensor | None  # (B, T) bool, True = real token; None = all real


def expert_load_by_group(
    record: RoutingRecord, group_ids: torch.Tensor, *, num_groups: int, num_experts: int
) -> torch.Tensor:
    """Assignments per (group, expert), padding excluded: e.g. group = each sample's modality id.

    ``group_ids`` (B,) long -> (num_groups, E) long counts over all k choices.
    """
    batch, seq, top_k = record.indices.shape
    groups = group_ids.to(record.indices.device).view(batch, 1, 1).expand(batch, seq, top_k)  # (B, T, k)
    cells = groups * num_experts + record.indices  # (B, T, k) flat (group, expert) cell
    if record.token_mask is not None:
        cells = cells[record.token_mask]  # (N_real, k)
    counts = torch.bincount(cells.reshape(-1), minlength=num_groups * num_experts)  # (G*E,)
    return counts.view(num_groups, num_experts)  # (G, E)
