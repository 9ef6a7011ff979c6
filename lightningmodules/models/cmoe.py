"""Uni-Med connector mixture-of-experts (CMoE): E projection experts mixed per visual token by a router.

Each expert is ``mlp2x_gelu`` (Linear(in, d) -> GELU -> Linear(d, d)); the output of a visual token is
``sum_e w_e * expert_e(token)``. The weights ``w`` come from one of four weightings:

- ``soft``: ``sigmoid(router logits)`` normalised to sum 1 over the experts (not a softmax);
- ``sparse``: the ``top_k`` router logits, softmax over the kept ones; only those experts run;
- ``hard``: one-hot by task id: task ``t`` uses expert ``t mod E`` only (so with E >= the number of
  image tasks every task owns an expert; with fewer experts tasks share them round-robin);
- ``constant``: ``1/E`` for every expert; no router is built or run.

The router (``soft`` / ``sparse`` only) is a per-token MLP ``(router_in -> ratio * router_in -> E, GELU)``
whose input is the visual token and a learned per-task embedding concatenated (``task_token``, the
default), the visual token alone (``token``) or the task embedding alone (``task``). The paper's ratio is
4, which makes the router cost more than all experts together; ``router_hidden_ratio`` makes it smaller.

The connector is a task-token router plus the LLM MoE's ``GroupedExperts`` (ungated, with bias, GELU,
``in -> d -> d``; weights ``w_in`` (E, in, d), ``b_in`` (E, d), ``w_out`` (E, d, d), ``b_out`` (E, d)):
dense weightings run every expert on every token (``GroupedExperts.mix_dense``, one batched matmul per
layer), sparse ones are grouped by expert with ``plan_dispatch`` and run by ``GroupedExperts.forward``.
With a ``MoEContext`` attached (the LightningModule's step) the connector records its ``RoutingRecord``
(task ids as ``group_ids``) and ``MoEStats`` (rows per expert) into it.
"""

from __future__ import annotations

import torch
from torch import nn

from lightningmodules.models.moe import (
    GroupedExperts,
    MoEContext,
    MoEStats,
    RouterOutput,
    RoutingRecord,
    UsesMoEContext,
    plan_dispatch,
)
from medcore.choices import ROUTER_INPUTS, WEIGHTINGS

DEFAULT_TASK_EMBED_DIM = 768  # Uni-Med's task token width (its ``task_token_c``)


def default_task_embed_dim(in_dim: int) -> int:
    """Uni-Med's 768, or the token width when that is smaller (tiny models)."""
    return min(DEFAULT_TASK_EMBED_DIM, in_dim)


class TaskTokenRouter(nn.Module):
    """Per-token MLP ``(router_in -> hidden -> E, GELU)`` on the token, the task embedding or both."""

    def __init__(
        self,
        *,
        in_dim: int,
        num_experts: int,
        router_input: str,
        num_tasks: int,
        task_embed_dim: int,
        hidden_ratio: float,
    ) -> None:
        super().__init__()
        if router_input not in ROUTER_INPUTS:
            raise ValueError(f"router_input must be one of {ROUTER_INPUTS}, got {router_input!r}")
        self.router_input = router_input
        self.uses_tasks = router_input != "token"
        self.uses_tokens = router_input != "task"
        if self.uses_tasks:
            self.task_embedding = nn.Embedding(num_tasks, task_embed_dim)
            nn.init.normal_(self.task_embedding.weight, std=0.02)  # as Uni-Med's task tokens
        hidden = max(
            1, round(hidden_ratio * ((in_dim if self.uses_tokens else 0) + (task_embed_dim if self.uses_tasks else 0)))
        )
        # fc1 on the concatenation [token, task embedding], stored as its two column blocks so the task
        # half runs once per image: fc1([x, t]) = fc1_token(x) + fc1_task(t) (one bias, on the first)
        self.fc1_token = nn.Linear(in_dim, hidden) if self.uses_tokens else None
        self.fc1_task = nn.Linear(task_embed_dim, hidden, bias=not self.uses_tokens) if self.uses_tasks else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(N, P, in), (N,) -> logits (N, P, E) (for ``task`` input: (N, 1, E), one per image)."""
        if self.router_input == "token":
            return self.fc2(self.act(self.fc1_token(features)))  # (N, P, E)
        task_part = self.fc1_task(self.task_embedding(task_ids))  # (N, H)
        if self.router_input == "task":
            return self.fc2(self.act(task_part)).unsqueeze(1)  # (N, 1, E)
        pre_activation = self.fc1_token(features)  # (N, P, H)
        pre_activation += task_part.unsqueeze(1)  # (N, P, H); in place: linear's backward keeps no output
        return self.fc2(self.act(pre_activation))  # (N, P, E)


class CMoEConnector(UsesMoEContext):
    """Uni-Med's connector mixture-of-experts: (N, P, in) visual tokens -> (N, P, d_llm)."""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int,
        num_experts: int = 5,
        router_input: str = "task_token",
        weighting: str = "soft",
        top_k: int = 2,
        router_hidden_ratio: float = 4.0,
        num_tasks: int = 6,
        task_embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "sparse" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.num_experts = num_experts
        self.weighting = weighting
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.experts = GroupedExperts(
            num_experts=num_experts,
            hidden_size=in_dim,
            ffn_size=out_dim,
            out_size=out_dim,
            gated=False,
            bias=True,
            activation="gelu",
        )
        self.router: TaskTokenRouter | None = None
        if weighting in ("soft", "sparse"):
            self.router = TaskTokenRouter(
                in_dim=in_dim,
                num_experts=num_experts,
                router_input=router_input,
                num_tasks=num_tasks,
                task_embed_dim=task_embed_dim or default_task_embed_dim(in_dim),
                hidden_ratio=router_hidden_ratio,
            )

    @property
    def needs_task_ids(self) -> bool:
        """Hard routing and task-conditioned routers need one task id per image."""
        return self.weighting == "hard" or (self.router is not None and self.router.uses_tasks)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, *, num_experts: int, **kwargs: object) -> CMoEConnector:
        """Upcycling: every expert starts as a copy of an ``MLPConnector`` (``fc1`` / ``fc2``).

        Since all weightings sum to 1, the result equals the MLP until the experts diverge.
        """
        cmoe = cls(in_dim=mlp.fc1.in_features, out_dim=mlp.fc1.out_features, num_experts=num_experts, **kwargs)
        with torch.no_grad():
            for e in range(num_experts):  # matmul layout: (in, d) and (d, d)
                cmoe.experts.load_expert(
                    e, w_in=mlp.fc1.weight.t(), w_out=mlp.fc2.weight.t(), b_in=mlp.fc1.bias, b_out=mlp.fc2.bias
                )
        return cmoe

    def route(self, features: torch.Tensor, task_ids: torch.Tensor | None) -> RouterOutput:
        """Each visual token's experts and weights, over the flat (N*P,) tokens: (N*P, k) with k = E for the
        dense weightings (every expert, in order), ``top_k`` for ``sparse`` and 1 for ``hard``."""
        n, p, _ = features.shape
        num_experts = self.num_experts
        if self.weighting == "hard":
            indices = (task_ids % num_experts).repeat_interleave(p).unsqueeze(1)  # (N*P, 1)
            counts = torch.bincount(indices.reshape(-1), minlength=num_experts)  # (E,)
            return RouterOutput(weights=features.new_ones(n * p, 1), indices=indices, counts=counts)
        every_expert = torch.arange(num_experts, device=features.device).expand(n * p, -1)  # (N*P, E) view
        all_tokens = torch.full((num_experts,), n * p, dtype=torch.long, device=features.device)  # (E,)
        if self.weighting == "constant":
            weights = features.new_full((1, num_experts), 1.0 / num_experts).expand(n * p, -1)  # (N*P, E) view
            return RouterOutput(weights=weights, indices=every_expert, counts=all_tokens)
        logits = self.router(features, task_ids).expand(n, p, -1).reshape(n * p, num_experts)  # (N*P, E)
        if self.weighting == "soft":
            scores = torch.sigmoid(logits)  # (N*P, E)
            weights = scores / scores.sum(dim=-1, keepdim=True)  # (N*P, E)
            return RouterOutput(weights=weights, indices=every_expert, counts=all_tokens, logits=logits)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (N*P, k)
        counts = torch.bincount(top_experts.reshape(-1), minlength=num_experts)  # (E,)
        gates = torch.softmax(top_logits, dim=-1)  # (N*P, k)
        return RouterOutput(weights=gates, indices=top_experts, counts=counts, logits=logits)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """(N, P, in) visual tokens, (N,) long task ids -> (N, P, d_llm)."""
        n, p, _ = features.shape
        if task_ids is not None:
            task_ids = task_ids.to(device=features.device, dtype=torch.long)
            if task_ids.shape != (n,):
                raise ValueError(f"task_ids must have shape ({n},) (one per image), got {tuple(task_ids.shape)}")
        elif self.needs_task_ids:
            raise ValueError(
                f"CMoE with weighting={self.weighting!r}"
                + (f" and router_input={self.router.router_input!r}" if self.router else "")
                + " needs task_ids (one long per image); got None"
            )
        tokens = features.reshape(n * p, self.in_dim)  # (N*P, in)
        routing = self.route(features, task_ids)
        if self.weighting in ("soft", "constant"):
            weights = routing.weights[:1] if self.weighting == "constant" else routing.weights  # (N*P|1, E)
            out = self.experts.mix_dense(tokens, weights)  # (N*P, d)
            computed_rows = [n * p] * self.num_experts
        else:
            plan = plan_dispatch(routing.indices, routing.weights, num_experts=self.num_experts)
            out = self.experts(tokens, plan)  # (N*P, d)
            computed_rows = list(plan.group_sizes)
        if self.moe_context is not None:
            self._record(self.moe_context, routing, computed_rows, task_ids, n, p)
        return out.reshape(n, p, self.out_dim)  # (N, P, d)

    def _record(
        self,
        context: MoEContext,
        routing: RouterOutput,
        computed_rows: list[int],
        task_ids: torch.Tensor | None,
        n: int,
        p: int,
    ) -> None:
        """The detached routing (task ids as group ids) and the rows per expert into the step's context."""
        top_k = routing.indices.shape[-1]
        record = RoutingRecord(
            indices=routing.indices.view(n, p, top_k),  # (N, P, k)
            weights=routing.weights.detach().view(n, p, top_k),  # (N, P, k)
            token_mask=None,
            num_experts=self.num_experts,
            group_ids=task_ids,
        )
        stats = MoEStats(
            routed_counts=routing.counts,
            kept_counts=routing.counts,
            computed_rows=computed_rows,
            num_tokens=n * p,
        )
        context.record(self, routing=record, stats=stats)
