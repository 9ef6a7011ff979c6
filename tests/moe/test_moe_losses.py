"""Aux losses against a hand computation; padding must not change them."""

from __future__ import annotations

import math

import torch
from moe_tiny import FFN, HIDDEN

from lightningmodules.models.moe import MoEFeedForward, moe_context


def _hand_losses(logits: list[list[float]], real: list[bool], top_k: int) -> tuple[float, float]:
    """Switch loss E * sum_e f_e P_e and z-loss mean(logsumexp^2) over real tokens, plain Python."""
    num_experts = len(logits[0])
    rows = [row for row, keep in zip(logits, real, strict=True) if keep]
    probs = []
    for row in rows:
        peak = max(row)
        exps = [math.exp(v - peak) for v in row]
        probs.append([v / sum(exps) for v in exps])
    counts = [0] * num_experts
    for p in probs:
        for e in sorted(range(num_experts), key=lambda e: -p[e])[:top_k]:
            counts[e] += 1
    fraction = [c / len(rows) for c in counts]
    mean_prob = [sum(p[e] for p in probs) / len(rows) for e in range(num_experts)]
    balance = num_experts * sum(f * m for f, m in zip(fraction, mean_prob, strict=True))
    z_loss = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    return balance, z_loss


def _check(top_k: int) -> None:
    layer = MoEFeedForward.build(
        hidden_size=HIDDEN, ffn_size=FFN, num_experts=3, top_k=top_k, load_balance_coef=0.5, z_loss_coef=0.25
    )
    torch.nn.init.normal_(layer.router.linear.weight, std=0.3)
    torch.nn.init.normal_(layer.router.linear.bias, std=0.3)
    x = torch.randn(2, 4, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    with moe_context(layer, mask) as context:
        layer(x)
    with torch.no_grad():
        logits = (x @ layer.router.linear.weight.t() + layer.router.linear.bias).reshape(8, 3).tolist()
    balance, z_loss = _hand_losses(logits, mask.reshape(-1).tolist(), top_k)
    stats = context.stats[layer]
    assert math.isclose(float(stats.load_balancing_loss), balance, rel_tol=1e-5)
    assert math.isclose(float(stats.z_loss), z_loss, rel_tol=1e-5)
    assert math.isclose(float(context.aux_loss().detach()), 0.5 * balance + 0.25 * z_loss, rel_tol=1e-5)

    # padding content must not matter, and unmasked padding would have changed the losses
    x_other = x.clone()
    x_other[~mask] = 5.0 * torch.randn(int((~mask).sum()), HIDDEN)
    with moe_context(layer, mask) as context:
        layer(x_other)
    assert math.isclose(float(context.stats[layer].load_balancing_loss), balance, rel_tol=1e-5)
    assert math.isclose(float(context.stats[layer].z_loss), z_loss, rel_tol=1e-5)
    with moe_context(layer, None) as context:
        layer(x_other)
    assert not math.isclose(float(context.stats[layer].z_loss), z_loss, rel_tol=1e-3)


def test_aux_losses_top1_match_hand_computation() -> None:
    _check(top_k=1)


def test_aux_losses_top2_match_hand_computation() -> None:
    _check(top_k=2)


def test_balance_loss_is_one_when_uniform() -> None:
    layer = MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.linear.weight.zero_()
        layer.router.linear.bias.zero_()
    with moe_context(layer) as context:
        layer(torch.randn(16, HIDDEN))
    # all probs 1/4; ties all go to one expert: f = (1, 0, 0, 0) -> loss = 4 * 1 * 1/4 = 1
    assert math.isclose(float(context.stats[layer].load_balancing_loss), 1.0, rel_tol=1e-6)
    assert math.isclose(float(context.stats[layer].z_loss), math.log(4) ** 2, rel_tol=1e-6)


def test_default_coefficients_are_zero_but_losses_are_computed() -> None:
    layer = MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=4, top_k=1)
    with moe_context(layer) as context:
        layer(torch.randn(6, HIDDEN))
    aux_loss, stats = context.aux_loss(), context.stats[layer]
    assert float(aux_loss.detach()) == 0.0 and aux_loss.requires_grad
    assert float(stats.load_balancing_loss) > 0 and float(stats.z_loss) > 0
