"""Region prompts (MedPLIB), the model side: a region mask -> ONE LLM token.

The data side (``datamodules/regions.py``) rasterises each prompt to a mask and carries it through the
vision tower's image geometry; the collator hands the model ``region_masks_input`` (R, H_in, W_in) bool
(each mask pixel for pixel aligned with ``pixel_values``), ``region_weights`` (R, G, G) (its soft patch
coverage) and ``region_batch_index`` (R,).

:class:`RegionEncoder` pools the vision patch features (the vision tower's output, before the connector)
under a region and projects them with ``adapter`` Linear(d_vision, d_llm) (MedPLIB's
``region_fea_adapter``) into one token, which :func:`splice_region_tokens` writes over a placeholder
token between ``<region>`` and ``</region>``. Two poolings (``model.grounding.region_pooling``):

- ``"points"`` (default): MedPLIB's released code (``model/medplib/model/medplib_arch.py`` at 5ab54bc:
  ``rand_sample`` l.32-37, ``point_sample`` l.39-64, ``extract_region_feature`` l.580-614, the adapter on
  the CLIP map in ``encode_images`` l.204-208). The mask's foreground pixels (row, col), in ``nonzero``'s
  row-major order; more than ``max_points`` (512, its ``max_sample_point``) -> a random subset of that
  many (``torch.randperm``); normalised grid coordinates ``x = 2 col / W - 1``, ``y = 2 row / H - 1``
  (the released code divides ``nonzero()`` by the mask size, then ``2 p - 1``: a pixel's top-left
  corner, and W rather than W - 1, so the last column lands at ``1 - 2 / W``); ``grid_sample`` of the
  (D_vision, G, G) patch map, bilinear, ``align_corners=True``, in float32 as released; the mean over
  the points; the adapter. An empty mask gives a zero vector (d_llm zeros, not the adapter's bias),
  counted in ``empty_region_count``.

  Randomness: while the module is training, the subset comes from the global torch RNG (CPU
  ``randperm``, as released, so ``torch.manual_seed`` / Lightning's ``seed_everything`` make it
  reproducible). In evaluation (``module.training`` False) each region draws with its own
  ``torch.Generator`` seeded with ``eval_seed`` (default 0), so evaluation is deterministic and a
  region's token depends only on its mask - not on the batch, the order or earlier draws. Regions with at
  most ``max_points`` pixels use every pixel and draw nothing.

  Mask resolution: as the released dataset (``datasets/LazySupervisedDataset.py`` l.516-520, cv2
  ``INTER_NEAREST`` by 1/14 from the padded 336 px mask to the 24 x 24 grid), a mask at the vision input
  resolution (H_in, W_in) is first nearest-resized to the G x G patch grid (cell i takes input pixel
  ``floor(i * H_in / G)``, as cv2's nearest does), so the points are grid cells at ``row / G`` and a
  region has at most G*G of them.

- ``"area"``: the coverage-weighted mean of the patch features, then the adapter - the mean over the
  region's pixels of the feature of the patch each pixel falls in. Given ``region_weights`` (R, G, G)
  it pools them as they are; given (R, H, W) masks it area-pools them to G x G first. An empty region
  (all-zero weights) pools the whole image (uniform weights), counted in ``empty_region_count``.

Why the adapter may run after the mean: the released code adapts the whole (G*G, D_vision) map, then
samples the adapted map. A bilinear sample at a point inside the grid (every point here: coordinates in
[-1, 1 - 2/W] with ``align_corners=True``, so no zero padding is read) is ``sum_k w_k f_k`` with
``w_k >= 0`` and ``sum_k w_k = 1``; the mean over points is again a combination ``sum_k a_k f_k`` with
``sum_k a_k = 1``. The adapter is affine, ``A(f) = W f + b``, so ``sum_k a_k A(f_k) = W (sum_k a_k f_k) +
b sum_k a_k = A(sum_k a_k f_k)``: the same token up to float rounding, for one (R, D) matmul instead of
one over every patch of every image. The one case where the order shows is the empty mask: released,
the mean over no samples is NaN and ``nan_to_num`` makes it 0 in the adapted (d_llm) space - a zero
vector, not ``b`` - which is written explicitly here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from medcore.choices import REGION_POOLINGS

REGION_START = "<region>"
REGION_END = "</region>"
REGION_PLACEHOLDER = "<region_feat>"  # one per region, between <region> and </region>
MAX_POINTS = 512  # MedPLIB's max_sample_point
EVAL_SEED = 0  # the generator seed of the "points" subset in evaluation


class RegionEncoder(nn.Module):
    """Patch features under a region -> one LLM token: ``"points"`` or ``"area"`` pooling (module docstring).

    ``adapter`` is MedPLIB's ``region_fea_adapter``: Linear(d_vision, d_llm), applied to the vision
    tower's patch features (not the connector's output).
    """

    def __init__(
        self,
        *,
        vision_hidden_size: int,
        llm_hidden_size: int,
        grid_size: int,
        pooling: str = "points",
        max_points: int = MAX_POINTS,
        eval_seed: int = EVAL_SEED,
    ) -> None:
        super().__init__()
        if pooling not in REGION_POOLINGS:
            raise ValueError(f"region pooling must be one of {REGION_POOLINGS}, got {pooling!r}")
        if max_points <= 0:
            raise ValueError(f"region max_points must be > 0, got {max_points}")
        self.grid_size = grid_size
        self.pooling = pooling
        self.max_points = int(max_points)
        self.eval_seed = int(eval_seed)
        self.adapter = nn.Linear(vision_hidden_size, llm_hidden_size)
        # points: regions without a pixel (zero token); area: regions without weight (whole image pooled)
        self.empty_region_count = 0

    def forward(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """patch_features (R, P = G*G, D_vision) and masks (R, H, W) (or weights (R, G, G)) -> (R, d_llm)."""
        regions, patches, _ = patch_features.shape
        if patches != self.grid_size**2:
            raise ValueError(f"{patches} patch features but a {self.grid_size}x{self.grid_size} grid")
        if masks.shape[0] != regions:
            raise ValueError(f"{masks.shape[0]} region masks for {regions} regions' patch features")
        if self.pooling == "area":
            return self.area_tokens(patch_features, masks)
        return self.point_tokens(patch_features, masks)

    # -- "area" ------------------------------------------------------------------------------------
    def grid_weights(self, masks: torch.Tensor) -> torch.Tensor:
        """(R, G, G) weights as given, or (R, H, W) masks aligned with the vision input area-pooled to (R, G, G)."""
        masks = masks.float()
        if tuple(masks.shape[-2:]) == (self.grid_size, self.grid_size):
            return masks
        return F.adaptive_avg_pool2d(masks[:, None], self.grid_size)[:, 0]  # (R, 1, H, W) -> (R, G, G)

    def area_tokens(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Coverage-weighted mean of the patch features, then the adapter: (R, d_llm)."""
        regions, patches, _ = patch_features.shape
        weights = self.grid_weights(masks).reshape(regions, patches).to(patch_features.dtype)  # (R, G*G)
        empty = weights.sum(dim=1) <= 0  # (R,)
        self.empty_region_count += int(empty.sum())
        weights = torch.where(empty[:, None], torch.ones_like(weights), weights)  # (R, P): empty -> whole image
        weights = weights / weights.sum(dim=1, keepdim=True)  # (R, P), rows sum to 1
        pooled = torch.einsum("rp,rpd->rd", weights, patch_features)  # (R, D_vision)
        return self.adapter(pooled)  # (R, d_llm)

    # -- "points" ----------------------------------------------------------------------------------
    def sample_points(self, mask: torch.Tensor) -> torch.Tensor:
        """(H, W) mask -> (N, 2) normalised (x, y) grid coordinates of up to ``max_points`` foreground pixels.

        As released: ``nonzero`` (row-major), a random ``max_points`` of them when there are more (the
        global torch RNG while training, a generator seeded with ``eval_seed`` in evaluation), and
        ``x = 2 col / W - 1``, ``y = 2 row / H - 1``.
        """
        height, width = mask.shape
        pixels = mask.nonzero()  # (N, 2): (row, col)
        if pixels.shape[0] > self.max_points:
            generator = None if self.training else torch.Generator().manual_seed(self.eval_seed)
            keep = torch.randperm(pixels.shape[0], generator=generator)[: self.max_points]  # (max_points,), CPU
            pixels = pixels[keep.to(pixels.device)]  # (max_points, 2)
        rows, cols = pixels.float().unbind(dim=-1)  # (N,), (N,)
        return torch.stack([cols / width * 2 - 1, rows / height * 2 - 1], dim=-1)  # (N, 2): (x, y)

    def point_tokens(self, patch_features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean of bilinear samples of the patch map at the region's points, then the adapter: (R, d_llm)."""
        regions, _, dim = patch_features.shape
        grid = self.grid_size
        if tuple(masks.shape[-2:]) != (grid, grid):  # the released nearest resize to the patch grid
            masks = F.interpolate((masks != 0)[:, None].float(), size=(grid, grid), mode="nearest")[:, 0]  # (R, G, G)
        points = [self.sample_points(mask != 0) for mask in masks]  # R x (N_r, 2)
        counts = torch.tensor([p.shape[0] for p in points], device=patch_features.device)  # (R,)
        empty = counts == 0  # (R,)
        self.empty_region_count += int(empty.sum())
        if regions == 0:
            return self.adapter(patch_features.new_zeros(0, dim))  # (0, d_llm)
        most = max(int(counts.max()), 1)
        coords = pad_sequence(points, batch_first=True)  # (R, N_max, 2); padding = the map's centre, masked out
        coords = F.pad(coords, (0, 0, 0, most - coords.shape[1]))  # (R, N, 2), N >= 1 even when every mask is empty
        coords = coords.to(patch_features.device, torch.float32)  # (R, N, 2)
        feature_map = patch_features.float().reshape(regions, grid, grid, dim)  # (R, G, G, D): row-major patches
        feature_map = feature_map.permute(0, 3, 1, 2)  # (R, D, G, G)
        samples = F.grid_sample(
            feature_map, coords[:, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True
        )  # (R, D, N, 1)
        samples = samples[..., 0].transpose(1, 2)  # (R, N, D)
        valid = torch.arange(most, device=counts.device)[None, :] < counts[:, None]  # (R, N)
        samples = samples.masked_fill(~valid[..., None], 0.0)  # (R, N, D)
        pooled = samples.sum(dim=1) / counts.clamp(min=1)[:, None]  # (R, D): the mean over each region's points
        tokens = self.adapter(pooled.to(self.adapter.weight.dtype))  # (R, d_llm)
        # an empty region: zeros (not the bias); torch.where keeps the adapter in the graph for DDP
        return torch.where(empty[:, None], torch.zeros_like(tokens), tokens)  # (R, d_llm)


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
