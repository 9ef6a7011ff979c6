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

Expert weights are stacked (``w1`` (E, in, d), ``b1`` (E, d), ``w2`` (E, d, d), ``b2`` (E, d)), so
dense weightings are one batched matmul per layer and sparse ones run one matmul per non-empty expert
on the tokens routed to it (tokens grouped by expert with a sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_INPUTS = ("task_token", "token", "task")
WEIGHTINGS = ("soft", "sparse", "hard", "constant")
DEFAULT_TASK_EMBED_DIM = 768  # Uni-Med's task token width (its ``task_token_c``)


@dataclass
class RoutingRecord:
    """The routing of the last forward, for logging: detached weights and the images' task ids."""

    weights: torch.Tensor  # (N, P, E), rows sum to 1
    task_ids: torch.Tensor | None  # (N,) long


def mean_weights_by_task(weights: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Mean routing weight per (task, expert): (N, P, E) weights, (N,) ids -> (num_tasks, E).

    Tasks without any image in ``task_ids`` get a row of NaN (no data, not "zero weight").
    """
    per_image = weights.float().mean(dim=1)  # (N, E)
    sums = per_image.new_zeros(num_tasks, per_image.shape[1]).index_add_(0, task_ids, per_image)  # (tasks, E)
    counts = torch.bincount(task_ids, minlength=num_tasks).to(sums.dtype)  # (tasks,)
    return sums / counts.unsqueeze(1)  # (tasks, E); 0 / 0 = NaN for absent tasks


def default_task_embed_dim(in_dim: int) -> int:
    """Uni-Med's 768, or the token width when that is smaller (tiny models)."""
    return min(DEFAULT_TASK_EMBED_DIM, in_dim)


class StackedExperts(nn.Module):
    """E ``Linear(in, d) -> GELU -> Linear(d, d)`` experts with their weights stacked along dim 0."""

    def __init__(self, *, num_experts: int, in_dim: int, out_dim: int, pad_slack: float = 1.25) -> None:
        super().__init__()
        self.num_experts = num_experts
        # sparse dispatch pads every expert's block to the largest one and runs all experts as one batched
        # matmul when that computes at most pad_slack x the routed rows (balanced routing); otherwise (e.g.
        # hard routing of a one-task batch) one matmul per non-empty expert on exactly its rows
        self.pad_slack = pad_slack
        self.w1 = nn.Parameter(torch.empty(num_experts, in_dim, out_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, out_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, out_dim, out_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def mix_dense(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_e w_e * expert_e(token)`` with every expert on every token: (T, in), (T|1, E) -> (T, d).

        Layer 1 is one batched matmul; the weights scale the hidden activations (layer 2 is linear), so
        layer 2 plus the weighted sum over experts is a single matmul with contraction over (E, d).
        """
        num_tokens = tokens.shape[0]
        shared = tokens.unsqueeze(0).expand(self.num_experts, -1, -1)  # (E, T, in), no copy
        hidden = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), shared, self.w1))  # (E, T, d)
        # (T, E, 1) first: the product takes its memory layout, so it is born token-major and the
        # reshape below is a view, not a copy
        weighted = weights.unsqueeze(-1) * hidden.transpose(0, 1)  # (T, E, d)
        flat = weighted.reshape(num_tokens, self.num_experts * self.w2.shape[-1])  # (T, E*d)
        return torch.addmm(weights @ self.b2, flat, self.w2.reshape(-1, self.w2.shape[-1]))  # (T, d)

    def mix_sparse(
        self, tokens: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Only the chosen experts per token: (T, in), (T, k) expert ids, (T, k) gates -> (T, d).

        Slots (token, choice) are sorted by expert, each non-empty expert runs once on its contiguous
        block of rows, and the results are permuted back and summed over the k choices. Returns the
        output and the per-expert row counts of the matmuls that ran. ``gates=None`` means weight 1.
        """
        num_tokens, k = experts.shape
        slot_experts = experts.reshape(num_tokens * k)  # (T*k,) slot = token * k + choice
        order = torch.argsort(slot_experts, stable=True)  # (T*k,) slots grouped by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts_tensor = torch.bincount(slot_experts, minlength=self.num_experts)  # (E,)
        counts = counts_tensor.tolist()
        if num_tokens and self.num_experts * max(counts) <= self.pad_slack * num_tokens * k:
            by_slot = self._padded(tokens, order, inverse, counts_tensor, max(counts), k)  # (T*k, d)
            return self._combine(by_slot, gates, num_tokens, k), counts
        # the grouped matmuls write into preallocated blocks (out=), which autocast does not cast
        dtype = (
            torch.get_autocast_dtype(tokens.device.type)
            if torch.is_autocast_enabled(tokens.device.type)
            else tokens.dtype
        )
        rows = tokens.to(dtype).index_select(0, torch.div(order, k, rounding_mode="floor"))  # (T*k, in) by expert
        params = (param.to(dtype) for param in (self.w1, self.b1, self.w2, self.b2))
        by_expert = GroupedExpertMLP.apply(rows, counts, *params)  # (T*k, d)
        by_slot = PermuteRows.apply(by_expert, inverse, order)  # (T*k, d) in slot order
        return self._combine(by_slot, gates, num_tokens, k), counts

    def _combine(self, by_slot: torch.Tensor, gates: torch.Tensor | None, num_tokens: int, k: int) -> torch.Tensor:
        """(T*k, d) expert outputs in slot order -> (T, d), gate-weighted over the k choices."""
        if gates is None and k == 1:
            return by_slot  # (T, d)
        by_slot = by_slot.view(num_tokens, k, self.w2.shape[-1])  # (T, k, d)
        if gates is None:
            return by_slot.sum(dim=1)  # (T, d)
        # gate-weighted sum over the k choices as one batched (1 x k) @ (k x d) product per token
        return torch.bmm(gates.unsqueeze(1).to(by_slot.dtype), by_slot).squeeze(1)  # (T, d)

    def _padded(
        self,
        tokens: torch.Tensor,
        order: torch.Tensor,
        inverse: torch.Tensor,
        counts: torch.Tensor,
        capacity: int,
        k: int,
    ) -> torch.Tensor:
        """Balanced routing: each expert's rows in a block of ``capacity`` rows, all experts in one batched
        matmul per layer (forward and backward), padding rows computed and dropped: (T, in) -> (T*k, d).

        Padding rows read token 0 and their outputs are never gathered, so they get no gradient.
        """
        starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
        sorted_experts = torch.repeat_interleave(torch.arange(self.num_experts, device=tokens.device), counts)
        position = torch.arange(order.numel(), device=tokens.device) - starts[sorted_experts]  # (T*k,) rank in block
        padded_of_sorted = sorted_experts * capacity + position  # (T*k,) padded row of each sorted slot
        source = torch.zeros(self.num_experts * capacity, dtype=torch.long, device=tokens.device)  # (E*C,)
        source[padded_of_sorted] = torch.div(order, k, rounding_mode="floor")  # token feeding each padded row
        blocks = padded_block_forward(
            tokens.index_select(0, source).view(self.num_experts, capacity, -1), self.w1, self.b1
        )  # (E, C, d) pre-activation
        hidden = F.gelu(blocks)  # (E, C, d)
        out = torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2)  # (E, C, d)
        slot_rows = padded_of_sorted.index_select(0, inverse)  # (T*k,) padded row of each slot
        return out.reshape(self.num_experts * capacity, -1).index_select(0, slot_rows)  # (T*k, d)


def padded_block_forward(blocks: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """Layer 1 of every expert on its padded block of rows: (E, C, in) -> (E, C, d) (tests count rows here)."""
    return torch.baddbmm(b1.unsqueeze(1), blocks, w1)


def expert_block_forward(rows: torch.Tensor, expert: int, w1: torch.Tensor, out: torch.Tensor) -> None:
    """Layer 1 of expert ``expert`` (no bias) on its block of rows, written into ``out``: (n, in) -> (n, d).

    The one place rows meet an expert (tests count the rows per expert here).
    """
    torch.mm(rows, w1[expert], out=out)


class GroupedExpertMLP(torch.autograd.Function):
    """Rows grouped by expert (``counts`` rows each, in expert order) through their expert's MLP.

    One matmul per non-empty expert and layer, forward and backward; gradients are written straight
    into the stacked (E, ...) gradient tensors (autograd on per-expert slices of the stacked
    parameters would allocate and add a full-size gradient per expert). Biases go in and their
    gradients come out through one small matmul with the (R, E) one-hot block membership, instead
    of one op per expert (each CPU op is a parallel region: fewer is faster on a busy machine).
    """

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        counts: list[int],
        w1: torch.Tensor,
        b1: torch.Tensor,
        w2: torch.Tensor,
        b2: torch.Tensor,
    ) -> torch.Tensor:
        starts = accumulate(counts[:-1], initial=0)
        blocks = [(e, start, start + n) for e, (start, n) in enumerate(zip(starts, counts, strict=True)) if n]
        expert_of_row = torch.repeat_interleave(
            torch.arange(len(counts), device=rows.device), torch.tensor(counts, device=rows.device)
        )  # (R,)
        membership = F.one_hot(expert_of_row, len(counts)).to(rows.dtype)  # (R, E)
        pre_activation = rows.new_empty(rows.shape[0], w1.shape[-1])  # (R, d)
        for e, start, end in blocks:
            expert_block_forward(rows[start:end], e, w1, pre_activation[start:end])
        pre_activation.addmm_(membership, b1)  # (R, d) + each row's expert bias
        hidden = F.gelu(pre_activation)  # (R, d)
        out = torch.empty_like(hidden)  # (R, d)
        for e, start, end in blocks:
            torch.mm(hidden[start:end], w2[e], out=out[start:end])
        out.addmm_(membership, b2)  # (R, d)
        ctx.blocks = blocks
        ctx.save_for_backward(rows, membership, pre_activation, hidden, w1, w2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        rows, membership, pre_activation, hidden, w1, w2 = ctx.saved_tensors
        blocks = ctx.blocks
        grad_out = grad_out.contiguous()  # (R, d)
        all_used = len(blocks) == w1.shape[0]
        grad_w1 = torch.empty_like(w1) if all_used else torch.zeros_like(w1)  # (E, in, d)
        grad_w2 = torch.empty_like(w2) if all_used else torch.zeros_like(w2)  # (E, d, d)
        grad_hidden = torch.empty_like(hidden)  # (R, d)
        for e, start, end in blocks:
            torch.mm(hidden[start:end].t(), grad_out[start:end], out=grad_w2[e])
            torch.mm(grad_out[start:end], w2[e].t(), out=grad_hidden[start:end])
        grad_b2 = membership.t() @ grad_out  # (E, d): per-expert row sums
        grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre_activation)  # (R, d)
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None  # (R, in)
        for e, start, end in blocks:
            torch.mm(rows[start:end].t(), grad_pre[start:end], out=grad_w1[e])
            if grad_rows is not None:
                torch.mm(grad_pre[start:end], w1[e].t(), out=grad_rows[start:end])
        grad_b1 = membership.t() @ grad_pre  # (E, d)
        return grad_rows, None, grad_w1, grad_b1, grad_w2, grad_b2


class PermuteRows(torch.autograd.Function):
    """``rows[perm]`` for a permutation, whose backward is the inverse gather (not a scatter-add)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


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


class CMoEConnector(nn.Module):
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
        self.experts = StackedExperts(num_experts=num_experts, in_dim=in_dim, out_dim=out_dim)
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
        self.last_routing: RoutingRecord | None = None
        self.last_expert_token_counts: list[int] | None = None  # rows per expert matmul (sparse / hard)

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
            cmoe.experts.w1.copy_(mlp.fc1.weight.t().unsqueeze(0))  # (E, in, d) <- (in, d)
            cmoe.experts.b1.copy_(mlp.fc1.bias.unsqueeze(0))  # (E, d)
            cmoe.experts.w2.copy_(mlp.fc2.weight.t().unsqueeze(0))  # (E, d, d)
            cmoe.experts.b2.copy_(mlp.fc2.bias.unsqueeze(0))  # (E, d)
        return cmoe

    def routing_weights(self, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Dense routing weights (N, P, E) (broadcast views for ``constant``); for inspection and tests."""
        n, p, _ = features.shape
        if self.weighting == "constant":
            return features.new_full((1, 1, self.num_experts), 1.0 / self.num_experts).expand(n, p, -1)
        if self.weighting == "hard":
            experts = (task_ids % self.num_experts).view(n, 1, 1).expand(n, p, 1)  # (N, P, 1)
            return features.new_zeros(n, p, self.num_experts).scatter_(-1, experts, 1.0)
        logits = self.router(features, task_ids).expand(n, p, -1)  # (N, P, E)
        if self.weighting == "soft":
            scores = torch.sigmoid(logits)  # (N, P, E)
            return scores / scores.sum(dim=-1, keepdim=True)
        top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (N, P, k)
        return torch.zeros_like(logits).scatter(-1, top_experts, torch.softmax(top_logits, dim=-1))

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

        if self.weighting in ("soft", "constant"):
            weights = self.routing_weights(features, task_ids)  # (N, P, E)
            flat_weights = (
                features.new_full((1, self.num_experts), 1.0 / self.num_experts)  # (1, E)
                if self.weighting == "constant"
                else weights.reshape(n * p, self.num_experts)
            )  # (N*P, E)
            out = self.experts.mix_dense(tokens, flat_weights)  # (N*P, d)
            self.last_expert_token_counts = None
        elif self.weighting == "sparse":
            logits = self.router(features, task_ids).expand(n, p, -1)  # (N, P, E)
            top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (N, P, k)
            gates = torch.softmax(top_logits, dim=-1)  # (N, P, k)
            out, self.last_expert_token_counts = self.experts.mix_sparse(
                tokens, top_experts.reshape(n * p, self.top_k), gates.reshape(n * p, self.top_k)
            )  # (N*P, d)
            weights = torch.zeros_like(logits).scatter(-1, top_experts, gates)  # (N, P, E)
        else:  # hard
            experts = (task_ids % self.num_experts).repeat_interleave(p).unsqueeze(1)  # (N*P, 1)
            out, self.last_expert_token_counts = self.experts.mix_sparse(tokens, experts)  # (N*P, d)
            weights = self.routing_weights(features, task_ids)  # (N, P, E)

        self.last_routing = RoutingRecord(weights=weights.detach(), task_ids=task_ids)
        return out.reshape(n, p, self.out_dim)  # (N, P, d)
