"""Med-MoE's modality router: one Linear classifier on pooled LLM hidden states.

Trained after stage 2 (the LLM frozen) to predict each sample's modality (CT, MRI, X-Ray, pathology ...);
its ``linear`` (with bias) then initialises the token routers of the stage-3 MoE layers, so class c of
the classifier becomes expert c.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, D) over the real tokens of ``attention_mask`` (B, T) -> (B, D)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    count = mask.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return (hidden * mask).sum(dim=1) / count  # (B, D)


class ModalityClassifier(nn.Module):
    """``Linear(hidden_size, len(modalities))`` with bias on the padding-masked mean of the hidden states."""

    def __init__(self, *, hidden_size: int, modalities: list[str]) -> None:
        super().__init__()
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise ValueError(f"modality classifier needs >= 2 distinct modalities, got {modalities}")
        self.modalities = list(modalities)
        self.linear = nn.Linear(hidden_size, len(modalities), bias=True)

    @property
    def num_classes(self) -> int:
        return len(self.modalities)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) hidden states, (B, T) mask -> (B, C) logits."""
        pooled = masked_mean(hidden, attention_mask)  # (B, D)
        return self.linear(pooled.to(self.linear.weight.dtype))  # (B, C)

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}"
