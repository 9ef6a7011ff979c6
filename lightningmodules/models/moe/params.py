"""Total parameters and parameters active per token of a model with MoE layers.

Convention: every parameter counts once (shared / tied tensors deduplicated), frozen ones included, and
everything outside MoE layers counts as active (embeddings and the LM head included, vision tower and
connector too when the whole multimodal model is passed), as llama-moe's ``estimate_moe_param`` and
MoE-LLaVA's "activated parameters" do. In each ``MoEFeedForward`` the active part is the router, ``top_k``
of the E experts and the meta expert. Capacity drops are ignored (an upper bound per token).
"""

from __future__ import annotations

from torch import nn

from .layer import MoEFeedForward


def _unique_numel(params, seen: set[int]) -> int:
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_parameters(model: nn.Module) -> dict[str, int | float]:
    """``{"total", "active_per_token", "active_fraction", "moe_layers", "experts_total", "experts_active",
    "routers", "meta_experts", "embeddings"}``; ``embeddings`` = input + (untied) output embeddings, a
    part of both counts, reported so readers can apply other conventions."""
    seen: set[int] = set()
    experts_total = experts_active = routers = meta = 0
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for layer in layers:
        routers += _unique_numel(layer.router.parameters(), seen)
        layer_experts = _unique_numel(layer.experts.parameters(), seen)
        experts_total += layer_experts
        experts_active += layer_experts * layer.top_k // layer.num_experts  # stacked: every tensor is (E, ...)
        if layer.meta_expert is not None:
            meta += _unique_numel(layer.meta_expert.parameters(), seen)
    rest = _unique_numel(model.parameters(), seen)
    total = rest + routers + experts_total + meta
    active = rest + routers + experts_active + meta

    embeddings = 0
    embedding_seen: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)() if hasattr(model, getter) else None
        if isinstance(module, nn.Module):
            embeddings += _unique_numel(module.parameters(), embedding_seen)
    return {
        "total": total,
        "active_per_token": active,
        "active_fraction": active / total if total else 0.0,
        "moe_layers": len(layers),
        "experts_total": experts_total,
        "experts_active": experts_active,
        "routers": routers,
        "meta_experts": meta,
        "embeddings": embeddings,
    }
