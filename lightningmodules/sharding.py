"""FSDP2 sharding of a network (``trainer.strategy: fsdp2``: Lightning's ``ModelParallelStrategy``).

``fully_shard`` gathers a module's parameters in a hook on its ``forward``. The multimodal model calls
its parts one by one (vision tower, connector, the LLM's embedding table, decoder layers, the LM head on
the supervised positions only), so the root's forward never runs and sharding only the root would leave
every part's weights sharded while it computes. Instead every module that owns parameters directly is
its own unit: a decoder layer (gathered once for its attention and FFN), and each Linear, Embedding,
norm and stacked-experts module outside one. A parameter shared by two modules (tied embeddings) goes
into the unit of their common ancestor. Each rank holds 1/N of every weight; parameters are DTensors
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
    """The modules ``fully_shard`` wraps, innermost first: each transformer layer, then every module outside
    one that owns parameters directly. A parameter owned by two units moves both up to their common parent."""
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
        unit = modules[0] if len(modules) == 1 else _common_parent(model, [names[id(m)] for m in modules])
        own_units[id(unit)] = unit
    # children before parents: fully_shard of a parent leaves the parameters its sharded children manage
    ordered = sorted(own_units.values(), key=lambda m: -names[id(m)].count("."))
    return units + ordered


def _common_parent(model: nn.Module, names: list[str]) -> nn.Module:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return model.get_submodule(".".join(common))


def shard_model(model: nn.Module, mesh: Any) -> int:
    """``fully_shard`` every unit of :func:`sharding_units` on ``mesh`` (its data-parallel dimension); returns
    how many units."""
    from torch.distributed.fsdp import fully_shard

    units = sharding_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    return len(units)
