"""The step's MoE context (mask in, records out) and per-group (modality) expert load."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from moe_tiny import FFN, HIDDEN

from lightningmodules.models.moe import (
    MoEContext,
    MoEFeedForward,
    attach_context,
    expert_load_by_group,
    moe_context,
    moe_layers,
)


def test_context_attaches_and_detaches() -> None:
    model = torch.nn.Sequential(
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
    )
    mask = torch.tensor([[1, 0]])
    with moe_context(model, mask) as context:
        assert all(layer.moe_context is context for _, layer in moe_layers(model))
        assert torch.equal(context.token_mask, mask.bool())
    assert all(layer.moe_context is None for _, layer in moe_layers(model))
    assert attach_context(model, MoEContext(mask)) == 2
    attach_context(model, None)
    assert all(layer.moe_context is None for _, layer in moe_layers(model))
    assert "context" not in str(list(model.state_dict()))


def test_context_records_each_layer_once_and_survives_copies() -> None:
    """A re-run (gradient checkpointing) replaces a layer's records; copies and pickles drop the context."""
    model = torch.nn.Sequential(
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
    )
    x = torch.randn(2, 3, HIDDEN)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    context = MoEContext(mask)
    attach_context(model, context)
    model(x)
    first = context.aux_loss()
    model(x)  # the same forward again (a checkpointed recompute)
    assert len(context.stats) == len(context.routing) == len(context.aux_losses) == 2
    torch.testing.assert_close(context.aux_loss(), first)
    assert all(stats.num_tokens == 5 for stats in context.stats.values())
    twin = copy.deepcopy(model)
    assert all(layer.moe_context is None for _, layer in moe_layers(twin))
    assert all(layer.moe_context is None for _, layer in moe_layers(pickle.loads(pickle.dumps(model))))
    with pytest.raises(ValueError, match="token mask has shape"):
        model(torch.randn(1, 3, HIDDEN))


def test_expert_load_by_group_counts_real_tokens_per_modality() -> None:
    layer = MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=4, top_k=2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    with moe_context(layer, mask) as context:
        layer(torch.randn(3, 4, HIDDEN))
    modality = torch.tensor([1, 0, 1])
    load = expert_load_by_group(context.routing[layer], modality, num_groups=3, num_experts=4)
    indices = context.routing[layer].indices
    expected = torch.zeros(3, 4, dtype=torch.long)
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                for e in indices[b, t].tolist():
                    expected[modality[b], e] += 1
    assert torch.equal(load, expected)
    assert int(load.sum()) == int(mask.sum()) * 2 and load[2].sum() == 0
    assert torch.equal(load.sum(0), context.stats[layer].routed_counts)
