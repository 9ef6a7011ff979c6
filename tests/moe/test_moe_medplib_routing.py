"""MedPLIB stage IV routing: a bias-free router with a gradient, DeepSpeed-style capacity with random token
dropping (1.5 in training, 2.0 in evaluation), and LoRA on every expert equal to peft's LoRA on the dense FFN."""

from __future__ import annotations

import math

import pytest
import torch
from moe_tiny import HIDDEN, tiny_lm
from torch import nn

from lightningmodules.models.moe import Capacity, TopKRouter, moe_context, moe_from_ffns, plan_dispatch


def _dense_ffn(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_lm(family, num_layers=1).get_decoder().layers[0].mlp


def _medplib_layer(capacity: Capacity | None = None) -> nn.Module:
    """Two experts from two different FFNs, top-1, softmax probability weights, no bias, no meta expert."""
    return moe_from_ffns(
        [_dense_ffn("llama", 0), _dense_ffn("llama", 1)],
        top_k=1,
        renormalize=False,
        router_bias=False,
        capacity=capacity,
    )


def test_router_without_bias_and_refuses_a_biased_init() -> None:
    router = TopKRouter(hidden_size=HIDDEN, num_experts=2, bias=False)
    assert router.linear.bias is None and [n for n, _ in router.named_parameters()] == ["linear.weight"]
    with pytest.raises(ValueError, match="has a bias but the router has none"):
        router.init_from_linear(nn.Linear(HIDDEN, 2, bias=True))
    router.init_from_linear(nn.Linear(HIDDEN, 2, bias=False))  # a bias-free classifier is fine
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(router(x).logits, x @ router.linear.weight.t())


def test_router_gets_a_gradient_with_probability_weights_but_none_when_renormalised() -> None:
    layer = _medplib_layer()
    x = torch.randn(2, 6, HIDDEN)
    layer(x).square().sum().backward()
    grad = layer.router.linear.weight.grad
    assert grad is not None and grad.abs().sum() > 0  # top-1 weight = softmax probability: differentiable
    # the previous recipe (renormalize: true): the top-1 weight is p / p = 1, the router gets no gradient
    renormalised = moe_from_ffns([_dense_ffn("llama", 0), _dense_ffn("llama", 1)], top_k=1, renormalize=True)
    renormalised(x).square().sum().backward()
    # zero up to rounding (p / p in float32): a million times below the probability-weighted router's
    assert renormalised.router.linear.weight.grad.abs().sum() < 1e-6 * grad.abs().sum()


def test_capacity_1_5_drops_a_random_subset_in_training_and_2_0_keeps_all_in_evaluation() -> None:
    layer = _medplib_layer(Capacity(factor=1.5, eval_factor=2.0, drop="random"))
    tokens = 20
    x = torch.randn(tokens, HIDDEN)
    with torch.no_grad():  # every token to expert 0: it is over capacity ceil(1.5 * 20 / 2) = 15
        layer.router.linear.weight.zero_()
        layer.router.linear.weight[0] = 1.0
        x = x.abs() + 0.1
    kept_sets = []
    layer.train()
    for seed in range(4):
        torch.manual_seed(seed)
        with moe_context(layer) as context:
            out = layer(x)
        stats = context.stats[layer]
        assert stats.capacity == math.ceil(1.5 * tokens / 2) == 15 and stats.dropped == 5
        kept = {row for row in range(tokens) if out[row].abs().sum() > 0}
        assert len(kept) == 15
        kept_sets.append(frozenset(kept))
    assert len(set(kept_sets)) > 1  # random selection (DeepSpeed use_rts), not the first 15 in token order
    assert any(s != frozenset(range(15)) for s in kept_sets)
    layer.eval()
    with moe_context(layer) as context:
        layer(x)
    assert context.stats[layer].capacity == tokens and context.stats[layer].dropped == 0  # ceil(2.0 * 20 / 2)


def test_position_policy_keeps_the_first_and_min_capacity_raises_the_limit() -> None:
    experts = torch.zeros(6, 1, dtype=torch.long)  # (N, k): six tokens to expert 0
    weights = torch.ones(6, 1)
    plan = plan_dispatch(experts, weights, num_experts=2, capacity=2, drop="position")
    assert plan.token_index.tolist() == [0, 1] and plan.dropped == 4
    limit = Capacity(factor=0.1, min_capacity=4).limit(num_tokens=6, top_k=1, num_experts=2, training=True)
    assert limit == 4  # ceil(0.1 * 6 / 2) = 1 < min_capacity
    with pytest.raises(ValueError, match="factor must be a finite number > 0"):
        Capacity(factor=float("nan"))


def test_random_drop_is_uniform_over_the_expert_tokens() -> None:
    experts = torch.zeros(10, 1, dtype=torch.long)
    hits = torch.zeros(10)
    torch.manual_seed(0)
    rounds = 2000
    for _ in range(rounds):
        plan = plan_dispatch(experts, torch.ones(10, 1), num_experts=2, capacity=5, drop="random")
        hits[plan.token_index] += 1
    # each token kept with probability 5/10; 2000 rounds: standard deviation ~22 around 1000
    assert torch.all((hits - rounds / 2).abs() < 120), hits


def _peft_ffn(family: str, rank: int, alpha: int):
    """The dense FFN with peft LoRA on every Linear of it, B randomised so the adapters matter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lm = tiny_lm(family, num_layers=1)
    targets = ["gate_proj", "up_proj", "down_proj"] if family == "llama" else ["fc1", "fc2"]
    peft_lm = get_peft_model(lm, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return peft_lm.base_model.model.get_decoder().layers[0].mlp, targets


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_expert_lora_equals_peft_lora_on_the_dense_ffn_and_merges(family: str) -> None:
    rank, alpha = 4, 16
    adapted, targets = _peft_ffn(family, rank, alpha)
    # two experts, each the FFN's base Linears, then peft's adapters copied into ExpertLoRA
    base_ffn = _dense_ffn(family, 9)
    for t in targets:
        getattr(base_ffn, t).load_state_dict(getattr(adapted, t).base_layer.state_dict())
    moe = moe_from_ffns([base_ffn, base_ffn], top_k=1, renormalize=True)
    lora = moe.experts.add_lora(rank=rank, alpha=alpha, dropout=0.0)
    with torch.no_grad():
        ins = targets[:-1]  # gate, up (llama) or fc1 (phi): the parts of w_in, in order
        for e in range(2):
            for p, t in enumerate(ins):
                lora.lora_a_in[e, p] = getattr(adapted, t).lora_A["default"].weight.t()  # (D, r)
                lora.lora_b_in[e, p] = getattr(adapted, t).lora_B["default"].weight.t()  # (r, F)
            lora.lora_a_out[e] = getattr(adapted, targets[-1]).lora_A["default"].weight.t()  # (F, r)
            lora.lora_b_out[e] = getattr(adapted, targets[-1]).lora_B["default"].weight.t()  # (r, D)
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        expected = adapted(x)  # peft's LoRA on the dense FFN
        out = moe(x)  # renormalised top-1 of two equal experts: weight 1
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert moe.experts.merge_lora() and moe.experts.lora is None
        torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_expert_lora_trains_only_the_adapters() -> None:
    layer = _medplib_layer()
    layer.experts.add_lora(rank=2, alpha=4, dropout=0.05)
    for name, param in layer.named_parameters():
        param.requires_grad_("lora_" in name)
    layer(torch.randn(3, 4, HIDDEN)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    assert set(grads) == {f"experts.lora.lora_{w}" for w in ("a_in", "b_in", "a_out", "b_out")}
    assert grads["experts.lora.lora_b_in"].abs().sum() > 0 and grads["experts.lora.lora_b_out"].abs().sum() > 0


def test_capacity_counts_padding_as_deepspeeds_gate_does() -> None:
    """DeepSpeed's gate sees the flattened micro-batch: padding rows are routed and count toward the limit."""
    x = torch.randn(2, 5, HIDDEN)
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])  # 7 real tokens, 3 padding
    for count_padding, tokens in ((False, 7), (True, 10)):
        layer = _medplib_layer(Capacity(factor=2.0, count_padding=count_padding))  # 2.0 of 2 experts: no drops
        with moe_context(layer, attention) as context:
            layer(x)
        stats = context.stats[layer]
        assert stats.capacity == tokens and sum(stats.computed_rows) == tokens, count_padding
