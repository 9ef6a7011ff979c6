"""Reaching MoE layers inside an HF model: the padding mask in, aux losses and statistics out.

HF decoder layers call ``mlp(hidden_states)`` with no mask, so before the LM forward the caller stores the
(B, T) attention mask on every ``MoEFeedForward`` (``set_token_mask``) and clears it afterwards. With
gradient checkpointing the layers run again during backward, so keep the mask set until backward is done
(``with token_mask(model, attention_mask): loss = ...; loss.backward()``, or clear in the next step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layer import MoEFeedForward
from .stats import MoEStats


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """Every ``MoEFeedForward`` in ``model`` with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoEFeedForward)]


def set_token_mask(model: nn.Module, mask: torch.Tensor | None) -> int:
    """Store the (B, T) mask (1/True = real token) on every MoE layer; returns how many layers got it."""
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"token mask must be (B, T), got shape {tuple(mask.shape)}")
    stored = None if mask is None else mask.bool()
    layers = moe_layers(model)
    for _, layer in layers:
        layer.token_mask = stored
    return len(layers)


def clear_token_mask(model: nn.Module) -> None:
    """Forget the mask on every MoE layer (all tokens are routed, e.g. during generation)."""
    set_token_mask(model, None)


@contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """``set_token_mask`` for the block, ``clear_token_mask`` after it."""
    set_token_mask(model, mask)
    try:
        yield
    finally:
        clear_token_mask(model)


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted aux losses of the last forward over all MoE layers (None without MoE layers)."""
    losses = [layer.last_aux_loss for _, layer in moe_layers(model) if layer.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def collect_stats(model: nn.Module) -> dict[str, MoEStats]:
    """``last_stats`` of every MoE layer that has run, keyed by module name."""
    return {name: layer.last_stats for name, layer in moe_layers(model) if layer.last_stats is not None}
