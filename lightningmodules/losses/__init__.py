"""Training losses that are not the LM's cross-entropy."""

from lightningmodules.losses.segmentation import mask_losses

__all__ = ["mask_losses"]
