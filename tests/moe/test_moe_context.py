"""Token-mask plumbing and per-group (modality) expert load."""

from __future__ import annotations

import torch
from moe_tiny import FFN, HIDDEN

from lightningmodules.models.moe import (
    MoEFeedForward,
    clear_token_mask,
    expert_load_by_group,
    moe_layers,
    set_token_mask,
    token_mask,
)


def test_token_mask_context_sets_and_clears() -> None:
    model = torch.nn.Sequential(
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
        MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=3),
    )
    mask = torch.tensor([[1, 0]])
    with token_mask(model, mask):
        assert all(torch.equal(layer.token_mask, mask.bool()) for _, layer in moe_layers(model))
    assert all(layer.token_mask is None for _, layer in moe_layers(model))
    assert set_token_mask(model, mask) == 2
    clear_token_mask(model)
    assert all(layer.token_mask is None for _, layer in moe_layers(model))
    assert "token_mask" not in str(list(model.state_dict()))


def test_expert_load_by_group_counts_real_tokens_per_modality() -> None:
    layer = MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=4, top_k=2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    set_token_mask(layer, mask)
    layer(torch.randn(3, 4, HIDDEN))
    modality = torch.tensor([1, 0, 1])
    load = expert_load_by_group(layer.last_routing, modality, num_groups=3, num_experts=4)
    indices = layer.last_routing.indices
    expected = torch.zeros(3, 4, dtype=torch.long)
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                for e in indices[b, t].tolist():
                    expected[modality[b], e] += 1
    assert torch.equal(load, expected)
    assert int(load.sum()) == int(mask.sum()) * 2 and load[2].sum() == 0
    assert torch.equal(load.sum(0), layer.last_stats.routed_counts)
