"""Sort-based, dropless-by-default token dispatch (megablocks style).

The (token, choice) assignments are flattened choice-major, sorted by expert with a stable sort, and
cut into one contiguous group per expert. Padding tokens get the sentinel expert E, so they sort to the
end and are cut off: no expert ever computes them. With a capacity, the first ``capacity`` assignments
of each expert are kept (all first choices before any second choice, then token order, as in GShard);
the rest are dropped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Which rows of the token matrix each expert computes, in expert order."""

    token_index: torch.Tensor  # (S,) long, token row of each kept assignment, grouped by expert
    weights: torch.Tensor  # (S,) float32 combine weight of each kept assignment
    group_sizes: list[int]  # E ints, rows per expert; sum = S
    routed_counts: torch.Tensor  # (E,) long, assignments per expert before capacity; padding excluded
    num_tokens: int  # rows of the token matrix, padding included
    num_real_tokens: int  # rows that are not padding
    dropped: int  # assignments dropped by the capacity limit
    capacity: int | None  # per-expert limit, None = dropless


def expert_capacity(*, capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """``ceil(capacity_factor * tokens * k / E)`` assignments per expert."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    capacity_factor: float | None = None,
) -> DispatchPlan:
    """Group the assignments ``indices`` (N, k) with combine ``weights`` (N, k) by expert."""
    num_tokens, top_k = indices.shape
    experts = indices.t()  # (k, N) choice-major: first choices claim capacity first
    if token_mask is not None:
        experts = experts.masked_fill(~token_mask.unsqueeze(0), num_experts)  # (k, N) padding -> sentinel E
    experts = experts.reshape(-1)  # (k*N,)
    sorted_experts, order = torch.sort(experts, stable=True)  # (k*N,), (k*N,)
    counts = torch.bincount(experts, minlength=num_experts + 1)  # (E+1,) last = padding slots
    routed_counts = counts[:num_experts]  # (E,)
    num_real_tokens = num_tokens if token_mask is None else int(token_mask.sum())

    capacity = None
    dropped = 0
    if capacity_factor is None:
        kept_counts = routed_counts  # (E,)
        order = order[: num_real_tokens * top_k]  # (S,) drop the padding tail
    else:
        capacity = expert_capacity(
            capacity_factor=capacity_factor, num_tokens=num_real_tokens, top_k=top_k, num_experts=num_experts
        )
        group_start = torch.cumsum(counts, dim=0) - counts  # (E+1,)
        rank_in_group = torch.arange(experts.numel(), device=experts.device) - group_start[sorted_experts]  # (k*N,)
        keep = (rank_in_group < capacity) & (sorted_experts < num_experts)  # (k*N,)
        order = order[keep]  # (S,)
        kept_counts = routed_counts.clamp(max=capacity)  # (E,)
        dropped = num_real_tokens * top_k - order.numel()

    token_index = order % num_tokens  # (S,) flat slot -> token row
    flat_weights = weights.t().reshape(-1)  # (k*N,) choice-major like ``experts``
    return DispatchPlan(
        token_index=token_index,
        weights=flat_weights[order],
        group_sizes=kept_counts.tolist(),
        routed_counts=routed_counts,
        num_tokens=num_tokens,
        num_real_tokens=num_real_tokens,
        dropped=dropped,
        capacity=capacity,
    )
