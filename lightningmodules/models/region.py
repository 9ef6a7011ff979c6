"""Region prompts (MedPLIB), the model side: vision-grid weights -> one LLM token per region.

The data side (``datamodules/regions.py``) rasterises each prompt to a mask, carries it through the
vision tower's image geometry and area-pools it onto the G x G patch grid; the collator hands the
model ``region_weights`` (R, G, G) and ``region_batch_index`` (R,).

:class:`RegionEncoder` takes the coverage-weighted mean of the vision patch features (the vision
tower's output, before the connector) and projects it with ``adapter`` Linear(d_vision, d_llm) into
ONE token, which :func:`splice_region_tokens` writes over a placeholder token between ``<region>`` and
``</region>``. MedPLIB's code averages the adapted features at randomly sampled region pixels; the
coverage-weighted mean is the deterministic, exact version of that estimate (the adapter is affine,
so pooling before or after it is the same).

Empty regions (all-zero weights, e.g. a mask without any pixel) pool the whole image (uniform
weights) and are counted in ``RegionEncoder.empty_region_count``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REGION_START = "<region>"
REGION_END = "</region>"
REGION_PLACEHOLDER = "<region_feat>"  # one per region, between <region> and </region>


class RegionEncoder(nn.Module):
    """Patch features under a region -> one LLM token: coverage-weighted mean, then ``adapter``.

    ``adapter`` is MedPLIB's ``region_fea_adapter``: Linear(d_vision, d_llm), applied to the vision
    tower's patch features (not the connector's output).
    """

    def __init__(self, *, vision_hidden_size: int, llm_hidden_size: int, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.adapter = nn.Linear(vision_hidden_size, llm_hidden_size)
        self.empty_region_count = 0  # regions with no pixel at all (pooled over the whole image)

    def grid_weights(self, masks: torch.Tensor) -> torch.Tensor:
        """(R, G, G) weights as given, or (R, H, W) masks aligned with the vision input area-pooled to (R, G, G)."""
        masks = masks.float()
        if tuple(masks.shape[-2:]) == (self.grid_size, self.grid_size):
            return masks
        return F.adaptive_avg_pool2d(masks[:, None], self.grid_size)[:, 0]  # (R, G, G)

    def forward(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """patch_features (R, P = G*G, D_vision) and masks (R, H, W) or (R, G, G) -> (R, d_llm)."""
        regions, patches, _ = patch_features.shape
        if patches != self.grid_size**2:
            raise ValueError(f"{patches} patch features but a {self.grid_size}x{self.grid_size} grid")
        weights = self.grid_weights(masks).reshape(regions, patches).to(patch_features.dtype)  # (R, P)
        empty = weights.sum(dim=1) <= 0  # (R,)
        self.empty_region_count += int(empty.sum())
        weights = torch.where(empty[:, None], torch.ones_like(weights), weights)  # (R, P): empty -> whole image
        weights = weights / weights.sum(dim=1, keepdim=True)  # (R, P), rows sum to 1
        pooled = torch.einsum("rp,rpd->rd", weights, patch_features)  # (R, D_vision)
        return self.adapter(pooled)  # (R, d_llm)


def splice_region_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, region_tokens: torch.Tensor, *, placeholder_id: int
) -> torch.Tensor:
    """Write region tokens (R, D) over the placeholder positions of embeds (B, T, D), in reading order.

    The encoder emits ``<region><region_feat></region>`` (one placeholder per region); regions must be
    ordered sample by sample, left to right, like ``MultimodalLM.embed`` orders images.
    """
    positions = input_ids == placeholder_id  # (B, T)
    count = int(positions.sum())
    if count != region_tokens.shape[0]:
        raise ValueError(f"batch has {count} region placeholders but {region_tokens.shape[0]} region tokens")
    if count == 0:
        return embeds
    return embeds.masked_scatter(positions.unsqueeze(-1), region_tokens.to(embeds.dtype))
