"""Dense connectors between vision features and the LLM embedding space."""

from __future__ import annotations

import torch
from torch import nn


class LinearConnector(nn.Module):
    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor, **_: object) -> torch.Tensor:
        return self.proj(features)


class MLPConnector(nn.Module):
    """LLaVA-1.5 ``mlp2x_gelu``: Linear(in, d) -> GELU -> Linear(d, d)."""

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor, **_: object) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))
