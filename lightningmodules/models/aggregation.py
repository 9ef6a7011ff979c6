"""Visual-token aggregation before the connector (Uni-Med: concat4; also 2x2 average / max pooling)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medcore.choices import AGGREGATIONS


class TokenAggregation(nn.Module):
    """Reduces P patch tokens of width D.

    - ``concat4``: 4 consecutive tokens (raster order) concatenated: (N, P, D) -> (N, P/4, 4D)
      (MiniGPT-v2 / Uni-Med).
    - ``avgpool`` / ``maxpool``: ``pool`` x ``pool`` spatial pooling on the patch grid:
      (N, P, D) -> (N, P/pool^2, D).
    - ``none``: unchanged.
    """

    def __init__(self, *, mode: str = "none", pool: int = 2) -> None:
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
        self.mode = mode
        self.pool = pool

    def output_shape(self, num_tokens: int, dim: int) -> tuple[int, int]:
        """(tokens, width) after aggregation; a ValueError naming the grid when the mode cannot handle it
        (an odd grid such as SigLIP so400m's 27x27 has no 2x2 cells: it fails here, not in the first batch)."""
        if self.mode == "none":
            return num_tokens, dim
        side = math.isqrt(num_tokens)
        grid = f"{side}x{side}" if side * side == num_tokens else f"{num_tokens} tokens, not a square grid"
        if self.mode == "concat4":
            if num_tokens % 4:
                raise ValueError(
                    f"concat4 needs a token count divisible by 4 (an even patch grid), the vision tower gives {grid}"
                )
            return num_tokens // 4, dim * 4
        if side * side != num_tokens or side % self.pool:
            raise ValueError(f"{self.mode} needs a square grid divisible by {self.pool}, the vision tower gives {grid}")
        return num_tokens // (self.pool * self.pool), dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return tokens
        n, p, d = tokens.shape
        if self.mode == "concat4":
            return tokens.reshape(n, p // 4, 4 * d)  # (N, P/4, 4D): 4 consecutive tokens side by side
        side = math.isqrt(p)
        grid = tokens.transpose(1, 2).reshape(n, d, side, side)  # (N, D, g, g)
        pool = F.avg_pool2d if self.mode == "avgpool" else F.max_pool2d
        pooled = pool(grid, self.pool)  # (N, D, g/pool, g/pool)
        return pooled.flatten(2).transpose(1, 2)  # (N, P/pool^2, D)
