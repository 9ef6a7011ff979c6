"""Sort-based, dropless-by-default token dispatch (megablocks style).

The (token, choice) assignments are flattened choice-major, sorted by expert with a stable sort, and
cut into one contiguous group per expert. Padding tokens get the sentinel expert E, so they sort to the
end and are cut off: no expert ever computes them. With a :class:`Capacity`, each expert keeps at most
``capacity`` assignments and the rest are dropped and counted: ``drop="position"`` keeps the first ones
(all first choices before any second choice, then token order, as in GShard), ``drop="random"`` a uniformly
random subset (DeepSpeed's top1gating with random token selection, ``use_rts``, which MedPLIB trains with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medcore.choices import DROP_POLICIES, DropPolicy


@dataclass(frozen=True)
class Capacity:
    """A per-expert limit on routed assignments, as DeepSpeed's gating sets it.

    ``limit`` = ``max(min_capacity, ceil(factor * tokens * k / E))`` with ``factor`` while the layer trains and
    ``eval_factor`` (default: ``factor``) in evaluation; MedPLIB stage IV: 1.5 in training, 2.0 in evaluation
    (with 2 experts and top-1, 2.0 is every token: nothing is dropped). ``drop`` picks which assignments an
    over-full expert keeps (module docstring). ``count_padding``: padding tokens are routed and compete for
    the capacity like real ones, as in DeepSpeed's gate, which sees the flattened micro-batch (their outputs are
    never used); off, padding is never routed and the limit counts real tokens only.
    """

    factor: float
    eval_factor: float | None = None
    min_capacity: int = 0
    drop: DropPolicy = "position"
    count_padding: bool = False

    def __post_init__(self) -> None:
        for name in ("factor", "eval_factor"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"capacity {name} must be a finite number > 0, got {value}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.drop not in DROP_POLICIES:
            raise ValueError(f"drop must be one of {DROP_POLICIES}, got {self.drop!r}")

    def limit(self, *, num_tokens: int, top_k: int, num_experts: int, training: bool) -> int:
        """Assignments each expert may compute for ``num_tokens`` real tokens."""
        factor = self.factor if training or self.eval_factor is None else self.eval_factor
        computed = expert_capacity(capacity_factor=factor, num_tokens=num_tokens, top_k=top_k, num_experts=num_experts)
        return max(self.min_capacity, computed)


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
    capacity: int | None = None,
    drop: DropPolicy = "position",
) -> DispatchPlan:
    """Group the assignments ``indices`` (N, k) with combine ``weights`` (N, k) by expert; ``capacity``: the
    per-expert limit (:meth:`Capacity.limit`), None = dropless; ``drop``: which assignments a full expert keeps."""
    num_tokens, top_k = indices.shape
    experts = indices.t()  # (k, N) choice-major: first choices claim capacity first
    if token_mask is not None:
        experts = experts.masked_fill(~token_mask.unsqueeze(0), num_experts)  # (k, N) padding -> sentinel E
    experts = experts.reshape(-1)  # (k*N,)
    if capacity is not None and drop == "random":
        # a random order first, then a stable sort by expert: each expert's group is in random order, so
        # its first ``capacity`` assignments are a uniformly random subset (DeepSpeed's use_rts)
        shuffle = torch.randperm(experts.numel(), device=experts.device)  # (k*N,)
        sorted_experts, order = torch.sort(experts[shuffle], stable=True)  # (k*N,), (k*N,)
        order = shuffle[order]  # (k*N,) positions in the choice-major flat list
    else:
        sorted_experts, order = torch.sort(experts, stable=True)  # (k*N,), (k*N,)
    counts = torch.bincount(experts, minlength=num_experts + 1)  # (E+1,) last = padding slots
    routed_counts = counts[:num_experts]  # (E,)
    num_real_tokens = num_tokens if token_mask is None else int(token_mask.sum())

    dropped = 0
    if capacity is None:
        kept_counts = routed_counts  # (E,)
        order = order[: num_real_tokens * top_k]  # (S,) drop the padding tail
    else:
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
