"""Router auxiliary losses over the tokens a layer actually routed (padding masked out)."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs: torch.Tensor, counts: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e`` = assignments to expert e (over all k choices, before any capacity drop) / real tokens, from
    ``counts`` (E,); ``P_e`` = mean router probability of e over real tokens, from ``probs`` (N, E). For
    top-1 this is Switch's loss; for top-k it equals transformers' Mixtral ``load_balancing_loss_func``.
    Minimum 1 (top-1) at a uniform router with uniform load; gradient flows through ``P_e`` only.
    """
    num_experts = probs.shape[-1]
    if token_mask is None:
        num_real = probs.shape[0]
        mean_probs = probs.mean(dim=0)  # (E,)
    else:
        mask = token_mask.to(probs.dtype).unsqueeze(1)  # (N, 1)
        num_real = int(token_mask.sum())
        mean_probs = (probs * mask).sum(dim=0) / max(num_real, 1)  # (E,)
    fraction = counts.to(probs.dtype) / max(num_real, 1)  # (E,)
    return num_experts * torch.sum(fraction * mean_probs)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean over real tokens of logsumexp(logits)^2``; ``logits`` (N, E)."""
    squared = torch.logsumexp(logits.float(), dim=-1).square()  # (N,)
    if token_mask is None:
        return squared.mean()
    return (squared * token_mask.to(squared.dtype)).sum() / max(int(token_mask.sum()), 1)
