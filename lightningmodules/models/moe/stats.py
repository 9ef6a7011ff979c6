"""What an MoE part did in one forward: counts, drops, aux losses and per-token expert choices.

Both the LLM's ``MoEFeedForward`` layers and the connector mixture (CMoE) record these into the step's
``MoEContext``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MoEStats:
    """Routing statistics of one forward (all tensors detached)."""

    routed_counts: torch.Tensor  # (E,) long, assignments per expert over all k, padding excluded
    kept_counts: torch.Tensor  # (E,) long, assignments computed (routed minus capacity drops)
    computed_rows: list[int]  # E ints, rows each expert's FFN ran on (dense mixing: every token)
    num_tokens: int  # real (non-padding) tokens routed
    dropped: int = 0  # assignments dropped by the capacity limit (0 when dropless)
    capacity: int | None = None  # per-expert limit, None = dropless
    load_balancing_loss: torch.Tensor | None = None  # () float, before its coefficient (LLM layers)
    z_loss: torch.Tensor | None = None  # () float, before its coefficient (LLM layers)

    @property
    def load(self) -> torch.Tensor:
        """Fraction of the routed assignments each expert received, (E,); sums to 1."""
        total = self.routed_counts.sum().clamp(min=1)
        return self.routed_counts.float() / total


@dataclass
class RoutingRecord:
    """Per-token expert choices of one forward, shaped like the input's leading dims (B, T) or (N, P).

    Dense mixtures (CMoE ``soft`` / ``constant``) list every expert per token (k = E).
    """

    indices: torch.Tensor  # (B, T, k) long chosen experts
    weights: torch.Tensor  # (B, T, k) float combine weights
    token_mask: torch.Tensor | None  # (B, T) bool, True = real token; None = all real
    num_experts: int
    group_ids: torch.Tensor | None = None  # (B,) long, e.g. the CMoE's task id per image

    def dense_weights(self) -> torch.Tensor:
        """The combine weight of every expert per token (0 for experts not chosen): (B, T, E)."""
        zeros = self.weights.new_zeros(*self.indices.shape[:-1], self.num_experts)  # (B, T, E)
        return zeros.scatter(-1, self.indices, self.weights)  # (B, T, E)


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
