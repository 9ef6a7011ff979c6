"""MoE feed-forward: router + grouped experts (+ an always-on meta expert), a drop-in for a decoder's mlp.

``out = sum_k w_k * expert_{i_k}(x) [+ meta_expert(x)]`` per token (Med-MoE: the meta expert is the
original dense FFN). HF decoder layers call ``mlp(hidden_states)`` without a padding mask, so the mask
reaches the layer through the step's ``MoEContext`` (``context.py``), attached before the LM forward; the
layer records into it its weighted aux loss (part of the graph), ``MoEStats`` and ``RoutingRecord``.
Without a context every token is routed and nothing is recorded (generation).
"""

from __future__ import annotations

import torch
from torch import nn

from .context import MoEContext, UsesMoEContext, context_users
from .dispatch import Capacity, DispatchPlan, plan_dispatch
from .experts import GroupedExperts, GroupedMM
from .losses import load_balancing_loss, router_z_loss
from .router import RouterOutput, TopKRouter
from .stats import MoEStats, RoutingRecord


class MoEFeedForward(UsesMoEContext):
    """Token-level top-k mixture of ``experts`` chosen by ``router``, plus an optional ``meta_expert``.

    ``capacity`` None is dropless; otherwise each expert computes at most ``capacity.limit(...)`` assignments
    (its training or evaluation factor by ``self.training``) and the rest contribute 0 (counted in
    ``MoEStats.dropped``). Aux losses are computed every forward with a context (for logging) and weighted
    by ``load_balance_coef`` / ``z_loss_coef`` (0 by default, as Med-MoE released) into the recorded aux loss.
    """

    def __init__(
        self,
        *,
        router: TopKRouter,
        experts: GroupedExperts,
        meta_expert: nn.Module | None = None,
        capacity: Capacity | None = None,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(f"router scores {router.num_experts} experts but there are {experts.num_experts}")
        self.router = router
        self.experts = experts
        self.meta_expert = meta_expert
        self.capacity = capacity
        self.load_balance_coef = load_balance_coef
        self.z_loss_coef = z_loss_coef

    @classmethod
    def build(
        cls,
        *,
        hidden_size: int,
        ffn_size: int,
        num_experts: int,
        top_k: int = 1,
        gated: bool = True,
        bias: bool = False,
        activation: str = "silu",
        meta_expert: nn.Module | None = None,
        renormalize: bool = False,
        jitter: float = 0.0,
        router_bias: bool = True,
        capacity: Capacity | None = None,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        grouped_mm: GroupedMM = "auto",
    ) -> MoEFeedForward:
        """A freshly initialised layer from sizes (experts get nn.Linear's default init)."""
        router = TopKRouter(
            hidden_size=hidden_size,
            num_experts=num_experts,
            top_k=top_k,
            renormalize=renormalize,
            jitter=jitter,
            bias=router_bias,
        )
        experts = GroupedExperts(
            num_experts=num_experts,
            hidden_size=hidden_size,
            ffn_size=ffn_size,
            gated=gated,
            bias=bias,
            activation=activation,
            grouped_mm=grouped_mm,
        )
        return cls(
            router=router,
            experts=experts,
            meta_expert=meta_expert,
            capacity=capacity,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
        )

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D); typically (B, T, D)."""
        leading_shape = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, D)
        context = self.moe_context
        token_mask = None if context is None else context.flat_token_mask(leading_shape, x.device)  # (B*T,)

        routing = self.router(x, token_mask=token_mask)
        # tokens routed: the real ones, or every row when the capacity counts padding (DeepSpeed's gate)
        routed_mask = None if self.capacity is not None and self.capacity.count_padding else token_mask  # (B*T,)
        routed_tokens = x.shape[0] if routed_mask is None else int(routed_mask.sum())
        limit = None
        if self.capacity is not None:
            limit = self.capacity.limit(
                num_tokens=routed_tokens, top_k=self.top_k, num_experts=self.num_experts, training=self.training
            )
        plan = plan_dispatch(
            routing.indices,
            routing.weights,
            num_experts=self.num_experts,
            token_mask=routed_mask,
            capacity=limit,
            drop="position" if self.capacity is None else self.capacity.drop,
        )
        out = self.experts(x, plan)  # (B*T, D)
        if plan.token_index.numel() == 0:
            # no kept assignment (e.g. a batch of padding only): the router is not in the output's graph, so
            # 0 * logits keeps its parameters in it and DDP (find_unused_parameters=False) does not wait for them
            out = out + 0.0 * routing.logits.sum().to(out.dtype)  # (B*T, D)
        if self.meta_expert is not None:
            out = out + self.meta_expert(x)  # (B*T, D)
        if context is not None:
            self._record(context, routing, plan, token_mask, leading_shape)  # token_mask (B*T,)
        return out.view(hidden_states.shape)  # (B, T, D)

    def _record(
        self,
        context: MoEContext,
        routing: RouterOutput,
        plan: DispatchPlan,
        token_mask: torch.Tensor | None,
        leading_shape: torch.Size,
    ) -> None:
        """Aux losses, statistics and per-token choices of this forward into the step's context."""
        balance = load_balancing_loss(routing.probs, routing.counts, token_mask)
        z_loss = router_z_loss(routing.logits, token_mask)
        stats = MoEStats(
            routed_counts=routing.counts.detach(),
            kept_counts=torch.tensor(plan.group_sizes, device=routing.counts.device),
            computed_rows=list(plan.group_sizes),
            num_tokens=plan.num_real_tokens,
            dropped=plan.dropped,
            capacity=plan.capacity,
            load_balancing_loss=balance.detach(),
            z_loss=z_loss.detach(),
        )
        record = RoutingRecord(
            indices=routing.indices.detach().view(*leading_shape, self.top_k),  # (B, T, k)
            weights=routing.weights.detach().view(*leading_shape, self.top_k),  # (B, T, k)
            token_mask=None if token_mask is None else token_mask.view(leading_shape),  # (B, T)
            num_experts=self.num_experts,
        )
        aux_loss = self.load_balance_coef * balance + self.z_loss_coef * z_loss
        context.record(self, routing=record, stats=stats, aux_loss=aux_loss)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, load_balance_coef={self.load_balance_coef}, z_loss_coef={self.z_loss_coef}"


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """Every ``MoEFeedForward`` in ``model`` with its qualified name, in module order."""
    return [(name, part) for name, part in context_users(model) if isinstance(part, MoEFeedForward)]
