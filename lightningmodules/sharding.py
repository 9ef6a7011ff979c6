"""FSDP2 sharding of a network (``trainer.strategy: fsdp2``: Lightning's ``ModelParallelStrategy``).

``fully_shard`` gathers a module's parameters in a hook on its ``forward``. The multimodal model calls
its parts one by one (vision tower, connector, the LLM's embedding table, decoder layers, the LM head on
the supervised positions only), so the root's forward never runs and sharding only the root would leave
every part's weights sharded while it computes. Instead every module that owns parameters directly is
its own unit: a decoder layer (gathered once for its attention and FFN), and each Linear, Embedding,
norm and stacked-experts module outside one. A parameter two such modules share (tied input and output
embeddings) would have to live in their common ancestor's unit, whose forward the model never calls: refused,
naming both. Each rank holds 1/N of every weight; parameters are DTensors
sharded on dimension 0, which is how a stage's hand-over is written, shard by shard
(``pipeline/handover.py``).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def layer_classes() -> tuple[type[nn.Module], ...]:
    """Transformer layers sharded as one unit each (HF's decoder and encoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return (GradientCheckpointingLayer,)


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules ``fully_shard`` wraps: each transformer layer, then every module outside one that owns
    parameters directly, deepest first. A parameter two of them share is a ``ValueError`` naming both."""
    layers = layer_classes()
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if isinstance(module, layers) and id(module) not in inside:
            units.append(module)
            inside.update(id(m) for m in module.modules())
    names = {id(m): n for n, m in model.named_modules()}
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    own_units: dict[int, nn.Module] = {}
    for modules in owners.values():
        if len(modules) > 1:
            shared = " and ".join(names[id(m)] for m in modules)
            raise ValueError(
                f"trainer.strategy fsdp2: {shared} share a weight (tied embeddings); FSDP2 gathers a weight in "
                "its module's forward, and the model calls each on its own: use ddp, or a checkpoint without "
                "tied embeddings (tie_word_embeddings: false)"
            )
        own_units[id(modules[0])] = modules[0]
    # children before parents: fully_shard of a parent leaves the parameters its sharded children manage
    ordered = sorted(own_units.values(), key=lambda m: -names[id(m)].count("."))
    return units + ordered


def shard_model(model: nn.Module, mesh: Any) -> int:
    """``fully_shard`` every unit of :func:`sharding_units` on ``mesh`` (its data-parallel dimension); returns
    how many units."""
    from torch.distributed.fsdp import fully_shard

    units = sharding_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    return len(units)
