"""Naive CMoE reference: a Python loop over experts and a router on the concatenated input.

Uses the connector's own parameters, so its outputs and gradients must equal the stacked module's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightningmodules.models.cmoe import CMoEConnector


def naive_expert(cmoe: CMoEConnector, tokens: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert`` as two nn.Linear-style layers: (..., in) -> (..., d)."""
    experts = cmoe.experts
    hidden = F.gelu(F.linear(tokens, experts.w_in[expert].t(), experts.b_in[expert]))
    return F.linear(hidden, experts.w_out[expert].t(), experts.b_out[expert])


def naive_router_logits(cmoe: CMoEConnector, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """The router MLP on the explicitly concatenated [token, task embedding]: (N, P, E)."""
    router = cmoe.router
    n, p, _ = features.shape
    parts = []
    if router.uses_tokens:
        parts.append(features)
    if router.uses_tasks:
        parts.append(router.task_embedding.weight[task_ids].unsqueeze(1).expand(n, p, -1))  # (N, P, t)
    weight = torch.cat([fc.weight for fc in (router.fc1_token, router.fc1_task) if fc is not None], dim=1)
    bias = (router.fc1_token or router.fc1_task).bias
    return router.fc2(F.gelu(F.linear(torch.cat(parts, dim=-1), weight, bias)))


def naive_weights(cmoe: CMoEConnector, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """Dense routing weights (N, P, E); sparse = softmax over the top-k logits, the rest masked."""
    n, p, _ = features.shape
    num_experts = cmoe.num_experts
    if cmoe.weighting == "constant":
        return torch.full((n, p, num_experts), 1.0 / num_experts)
    if cmoe.weighting == "hard":
        return F.one_hot(task_ids % num_experts, num_experts).float().unsqueeze(1).expand(n, p, -1)
    logits = naive_router_logits(cmoe, features, task_ids)
    if cmoe.weighting == "soft":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(-1, keepdim=True)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.topk(cmoe.top_k, dim=-1).indices, True)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def naive_forward(cmoe: CMoEConnector, features: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
    """sum_e w_e * expert_e(token), every expert on every token: (N, P, d)."""
    weights = naive_weights(cmoe, features, task_ids)
    return sum(weights[..., e : e + 1] * naive_expert(cmoe, features, e) for e in range(cmoe.num_experts))
