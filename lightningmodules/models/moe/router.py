"""Token router: a Linear (with bias by default; MedPLIB's has none) scoring E experts, top-k per token.

Med-MoE initialises this Linear from the stage-2 modality classifier (``init_from_linear``) and freezes
it; freezing is the caller's business (``requires_grad_(False)``). Combine weights are the softmax
probabilities of the chosen experts over all E (Med-MoE, Switch); ``renormalize=True`` rescales them to
sum to 1 over the k chosen (Mixtral).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What the router decided for N tokens."""

    weights: torch.Tensor  # (N, k) float32 combine weights of the chosen experts
    indices: torch.Tensor  # (N, k) long, chosen experts, best first
    counts: torch.Tensor  # (E,) long, assignments per expert over all k; padding excluded
    logits: torch.Tensor | None = None  # (N, E) float32; None for routers without scores (CMoE hard, constant)
    probs: torch.Tensor | None = None  # (N, E) float32 softmax over all experts


class TopKRouter(nn.Module):
    """``Linear(hidden_size, num_experts)`` (``bias``: Med-MoE / DeepSpeed yes, MedPLIB no), softmax over
    experts, top-k per token."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int = 1,
        renormalize: bool = False,
        jitter: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.jitter = jitter  # Switch-style multiplicative input noise, training only; 0 = off
        self.linear = nn.Linear(hidden_size, num_experts, bias=bias)

    @torch.no_grad()
    def init_from_linear(self, linear: nn.Linear) -> None:
        """Copy a classifier ``Linear(hidden_size, num_experts)`` (e.g. the modality router) into the router.

        A classifier without bias gives a zero bias; a classifier's bias into a router without one is refused.
        """
        if tuple(linear.weight.shape) != tuple(self.linear.weight.shape):
            raise ValueError(
                f"router init: classifier weight is {tuple(linear.weight.shape)}, the router needs "
                f"{tuple(self.linear.weight.shape)} (num_experts, hidden_size)"
            )
        if linear.bias is not None and self.linear.bias is None:
            raise ValueError("router init: the classifier has a bias but the router has none (set router_bias)")
        self.linear.weight.copy_(linear.weight)
        if self.linear.bias is not None:
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
            else:
                self.linear.bias.zero_()

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        """Route ``x`` (N, D); ``token_mask`` (N,) bool marks real tokens (padding False) for ``counts``."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)  # (N, D)
            x = x * noise
        # routing in float32 whatever the model dtype or autocast (as DeepSpeed's TopKGate, which Med-MoE uses)
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.linear.bias is None else self.linear.bias.float()
            logits = F.linear(x.float(), self.linear.weight.float(), bias)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        weights, indices = probs.topk(self.top_k, dim=-1)  # (N, k), (N, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
        routed = indices if token_mask is None else indices[token_mask]  # (N_real, k)
        counts = torch.bincount(routed.reshape(-1), minlength=self.num_experts)  # (E,)
        return RouterOutput(weights=weights, indices=indices, counts=counts, logits=logits, probs=probs)

    def extra_repr(self) -> str:
        return (
            f"top_k={self.top_k}, renormalize={self.renormalize}, jitter={self.jitter}, "
            f"bias={self.linear.bias is not None}"
        )
