"""One step's MoE state: the (B, T) padding mask in; aux losses, statistics and routing out.

HF decoder layers call ``mlp(hidden_states)`` with no mask, and the connector mixture (CMoE) is called
deep inside the multimodal model, so the LightningModule opens one ``MoEContext`` for the step and
attaches it to every MoE part (``attach_context``); each part reads the mask from it and records into it.
The context stays attached until the next step opens a new one: gradient-checkpointed layers re-run their
forward during backward (possibly on autograd's worker threads) and must see the same mask; their second
recording replaces the first with the same values. Before generation the context is detached
(``attach_context(model, None)``): KV-cache steps have other shapes, every token is routed and nothing is
recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .stats import MoEStats, RoutingRecord


class MoEContext:
    """The padding mask of a step and what each MoE part recorded in it, keyed by the part (module)."""

    def __init__(self, token_mask: torch.Tensor | None = None) -> None:
        if token_mask is not None and token_mask.dim() != 2:
            raise ValueError(f"token mask must be (B, T), got shape {tuple(token_mask.shape)}")
        self.token_mask = None if token_mask is None else token_mask.bool()  # (B, T), True = real token
        self.aux_losses: dict[nn.Module, torch.Tensor] = {}  # weighted aux loss, part of the graph
        self.stats: dict[nn.Module, MoEStats] = {}
        self.routing: dict[nn.Module, RoutingRecord] = {}

    def flat_token_mask(self, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The mask as (B*T,) bool for hidden states with leading shape (B, T); None = every token is real."""
        if self.token_mask is None:
            return None
        if tuple(self.token_mask.shape) != tuple(leading_shape):
            raise ValueError(
                f"MoE token mask has shape {tuple(self.token_mask.shape)} but the layer got hidden states "
                f"with leading shape {tuple(leading_shape)}; open a context with this batch's attention mask, "
                f"or detach it (attach_context(model, None)) before generate"
            )
        return self.token_mask.to(device=device).reshape(-1)  # (B*T,)

    def record(
        self,
        part: nn.Module,
        *,
        routing: RoutingRecord,
        stats: MoEStats | None = None,
        aux_loss: torch.Tensor | None = None,
    ) -> None:
        """Keep ``part``'s results of its latest forward (a re-run replaces them)."""
        self.routing[part] = routing
        if stats is not None:
            self.stats[part] = stats
        if aux_loss is not None:
            self.aux_losses[part] = aux_loss

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the recorded weighted aux losses (None when no part recorded one)."""
        return torch.stack(list(self.aux_losses.values())).sum() if self.aux_losses else None


class UsesMoEContext(nn.Module):
    """An MoE part that reads the step's ``MoEContext`` (``moe_context``, None = no mask, record nothing)."""

    moe_context: MoEContext | None = None

    def __getstate__(self) -> dict:
        """Pickle / deepcopy without the step's context (its aux losses are non-leaf graph tensors)."""
        state = self.__dict__.copy()
        state.pop("moe_context", None)
        return state


def context_users(model: nn.Module) -> list[tuple[str, UsesMoEContext]]:
    """Every MoE part in ``model`` with its qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, UsesMoEContext)]


def attach_context(model: nn.Module | Iterable[UsesMoEContext], context: MoEContext | None) -> int:
    """Give every MoE part of ``model`` (or the given parts) ``context``; None detaches. Returns the count."""
    parts = [part for _, part in context_users(model)] if isinstance(model, nn.Module) else list(model)
    for part in parts:
        part.moe_context = context
    return len(parts)


@contextmanager
def moe_context(model: nn.Module, token_mask: torch.Tensor | None = None) -> Iterator[MoEContext]:
    """A fresh context attached to ``model``'s MoE parts for the block, detached after it."""
    context = MoEContext(token_mask)
    attach_context(model, context)
    try:
        yield context
    finally:
        attach_context(model, None)
