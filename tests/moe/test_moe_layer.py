"""MoEFeedForward / GroupedExperts / TopKRouter against dense FFNs, the Mixtral block and hand checks."""

from __future__ import annotations

import pytest
import torch
from moe_tiny import FFN, HIDDEN, tiny_lm
from torch import nn

from lightningmodules.models.moe import (
    Capacity,
    GroupedExperts,
    MoEFeedForward,
    TopKRouter,
    moe_context,
    moe_from_ffns,
    upcycle_ffn,
)


def _dense_ffn(family: str) -> nn.Module:
    return tiny_lm(family, num_layers=1).get_decoder().layers[0].mlp


@pytest.mark.parametrize("grouped_mm", ["never", "always"])
def test_one_expert_moe_equals_dense_ffn_incl_grads(family: str, grouped_mm: str) -> None:
    dense = _dense_ffn(family)
    moe = upcycle_ffn(dense, num_experts=1, top_k=1, meta=False, renormalize=True, grouped_mm=grouped_mm)
    x = torch.randn(3, 7, HIDDEN)
    x_dense, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(3, 7, HIDDEN)
    out_dense, out_moe = dense(x_dense), moe(x_moe)
    torch.testing.assert_close(out_moe, out_dense, atol=1e-6, rtol=0)
    (out_dense * upstream).sum().backward()
    (out_moe * upstream).sum().backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad, atol=1e-6, rtol=0)
    # expert parameter grads = the dense FFN's grads in matmul layout (w_in = [gate | up])
    if family == "llama":
        expected = {
            "w_in": torch.cat([dense.gate_proj.weight.grad.t(), dense.up_proj.weight.grad.t()], dim=1),
            "w_out": dense.down_proj.weight.grad.t(),
        }
    else:
        expected = {
            "w_in": dense.fc1.weight.grad.t(),
            "w_out": dense.fc2.weight.grad.t(),
            "b_in": dense.fc1.bias.grad,
            "b_out": dense.fc2.bias.grad,
        }
    assert {n for n, _ in moe.experts.named_parameters()} == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(getattr(moe.experts, name).grad[0], grad, atol=1e-5, rtol=1e-5)


def test_autocast_bf16_and_frozen_experts() -> None:
    dense = _dense_ffn("llama")
    moe = upcycle_ffn(dense, num_experts=4, top_k=2, meta=False, renormalize=True)
    x = torch.randn(2, 6, HIDDEN, requires_grad=True)
    with torch.no_grad():
        reference = moe(x)  # fp32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16), moe_context(moe) as context:
        out = moe(x)
    assert out.dtype == torch.bfloat16
    assert context.routing[moe].weights.dtype == torch.float32  # routing stays in float32
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert moe.experts.w_in.grad.dtype == torch.float32 and x.grad is not None

    moe.experts.requires_grad_(False)
    x.grad = None
    moe(x).sum().backward()
    assert x.grad is not None and moe.experts.w_in.grad is not None  # (the old grad, untouched)


def test_meta_expert_unnormalised_top1_is_dense_times_one_plus_p(family: str) -> None:
    dense = _dense_ffn(family)
    moe = upcycle_ffn(dense, num_experts=4, top_k=1, meta=True, renormalize=False)
    nn.init.normal_(moe.router.linear.weight, std=0.5)
    nn.init.normal_(moe.router.linear.bias, std=0.5)
    assert moe.meta_expert is dense  # Med-MoE: the meta expert is the original FFN itself
    x = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        logits = x @ moe.router.linear.weight.t() + moe.router.linear.bias  # (2, 5, 4)
        p_top1 = logits.softmax(-1).max(-1).values  # (2, 5)
        expected = dense(x) * (1 + p_top1).unsqueeze(-1)
        torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=1e-5)
    assert 0.25 < float(p_top1.min()) and float(p_top1.max()) < 1.0  # not a degenerate case


def _mixtral_block(num_experts: int = 8, top_k: int = 2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.2)
    return block


def _ours_from_mixtral(block, grouped_mm: str = "auto") -> MoEFeedForward:
    num_experts, top_k = block.experts.num_experts, block.top_k
    moe = MoEFeedForward.build(
        hidden_size=HIDDEN,
        ffn_size=FFN,
        num_experts=num_experts,
        top_k=top_k,
        gated=True,
        bias=False,
        activation="silu",
        renormalize=True,
        grouped_mm=grouped_mm,
    )
    with torch.no_grad():
        moe.router.linear.weight.copy_(block.gate.weight)  # (E, D)
        moe.router.linear.bias.zero_()
        moe.experts.w_in.copy_(block.experts.gate_up_proj.transpose(1, 2))  # (E, 2F, D) -> (E, D, 2F) [gate | up]
        moe.experts.w_out.copy_(block.experts.down_proj.transpose(1, 2))  # (E, D, F) -> (E, F, D)
    return moe


@pytest.mark.parametrize("grouped_mm", ["never", "always"])
def test_matches_transformers_mixtral_block(grouped_mm: str) -> None:
    block = _mixtral_block()
    ours = _ours_from_mixtral(block, grouped_mm)
    x = torch.randn(4, 9, HIDDEN)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf, out_ours = block(x_hf), ours(x_ours)
    torch.testing.assert_close(out_ours, out_hf, atol=1e-5, rtol=0)
    upstream = torch.randn_like(out_hf)
    (out_hf * upstream).sum().backward()
    (out_ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours.experts.w_in.grad, block.experts.gate_up_proj.grad.transpose(1, 2), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(ours.router.linear.weight.grad, block.gate.weight.grad, atol=1e-5, rtol=1e-5)


def _layer(num_experts: int = 4, top_k: int = 1, **kwargs) -> MoEFeedForward:
    return MoEFeedForward.build(hidden_size=HIDDEN, ffn_size=FFN, num_experts=num_experts, top_k=top_k, **kwargs)


def _force_router(layer: MoEFeedForward, expert_of_token: torch.Tensor, x: torch.Tensor) -> None:
    """Make the router pick ``expert_of_token`` (N,) for the rows of ``x`` (N, D) (one-hot features)."""
    with torch.no_grad():
        x.zero_()
        x[torch.arange(x.shape[0]), expert_of_token] = 1.0  # feature e set -> expert e
        layer.router.linear.weight.zero_()
        layer.router.linear.weight[:, : layer.num_experts] = 10.0 * torch.eye(layer.num_experts)
        layer.router.linear.bias.zero_()


def test_counts_exclude_padding_and_padding_is_never_computed() -> None:
    layer = _layer(num_experts=4, top_k=2)
    x = torch.randn(2, 6, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with moe_context(layer, mask) as context:
        out = layer(x)
    routing, stats = context.routing[layer], context.stats[layer]
    expected = torch.bincount(routing.indices[mask].reshape(-1), minlength=4)
    assert torch.equal(stats.routed_counts, expected)
    assert int(stats.routed_counts.sum()) == 9 * 2 and stats.num_tokens == 9
    assert stats.computed_rows == expected.tolist()  # rows fed to each expert's matmul
    assert torch.all(out[~mask] == 0)  # padding rows: no expert ran, no meta expert configured


def test_experts_compute_only_routed_tokens() -> None:
    """Count the rows each expert computes with a forward hook on the experts' activation (one call per
    non-empty expert, on its gate half (n_e, FFN))."""
    layer = _layer(num_experts=4, top_k=1, grouped_mm="never")
    x = torch.empty(10, HIDDEN)
    choice = torch.tensor([0, 0, 0, 2, 2, 0, 3, 3, 3, 3])
    _force_router(layer, choice, x)
    seen: list[tuple[int, int]] = []
    hook = layer.experts.activation.register_forward_hook(lambda _, args, out: seen.append(tuple(args[0].shape)))
    with moe_context(layer) as context:
        layer(x)
    hook.remove()
    assert context.routing[layer].indices.view(-1).tolist() == choice.tolist()
    assert seen == [(4, FFN), (2, FFN), (4, FFN)]  # expert 1 got nothing and never ran
    assert context.stats[layer].computed_rows == [4, 0, 2, 4]


def test_every_expert_gets_a_grad_even_with_zero_tokens() -> None:
    for grouped_mm in ("never", "always"):
        layer = _layer(num_experts=4, top_k=1, bias=True, gated=False, activation="gelu_new", grouped_mm=grouped_mm)
        x = torch.empty(6, HIDDEN)
        _force_router(layer, torch.tensor([0, 0, 2, 2, 2, 0]), x)
        layer(x).pow(2).sum().backward()
        for name, param in layer.experts.named_parameters():
            assert param.grad is not None, name
            assert torch.all(param.grad[1] == 0) and torch.all(param.grad[3] == 0), name  # empty experts: zero
            assert param.grad[0].abs().sum() > 0, name

    # no token at all reaches any expert (all padding): still every parameter joins autograd
    layer = _layer(num_experts=4, top_k=1)
    with moe_context(layer, torch.zeros(1, 5, dtype=torch.bool)):
        layer(torch.randn(1, 5, HIDDEN)).sum().backward()
    assert all(p.grad is not None for p in layer.experts.parameters())


@pytest.mark.parametrize("gated, bias, activation", [(True, False, "silu"), (False, True, "gelu_new")])
def test_loop_backward_equals_autograd_of_the_per_expert_reference(gated: bool, bias: bool, activation: str) -> None:
    """The hand-written loop backward (one activation backward over all rows) against plain autograd through
    ``expert_forward`` per token, top-2 of 4 with an expert that gets no token."""
    torch.manual_seed(0)
    layer = _layer(num_experts=4, top_k=2, gated=gated, bias=bias, activation=activation, grouped_mm="never")
    with torch.no_grad():
        layer.router.linear.bias.copy_(torch.tensor([2.0, 0.0, -50.0, 1.0]))  # expert 2: never chosen
    x = torch.randn(2, 7, HIDDEN, requires_grad=True)
    upstream = torch.randn(2, 7, HIDDEN)
    with moe_context(layer) as context:
        (layer(x) * upstream).sum().backward()
    assert context.stats[layer].routed_counts[2] == 0
    ours = {n: p.grad.clone() for n, p in layer.named_parameters()}
    ours_x = x.grad.clone()

    layer.zero_grad()
    x.grad = None
    flat = x.reshape(-1, HIDDEN)  # (N, D)
    routing = layer.router(flat)
    out = torch.zeros_like(flat)  # (N, D)
    for k in range(2):
        for e in range(4):
            rows = (routing.indices[:, k] == e).nonzero().squeeze(1)  # (n,)
            if rows.numel():
                y = routing.weights[rows, k : k + 1] * layer.experts.expert_forward(e, flat[rows])  # (n, D)
                out = out.index_add(0, rows, y)
    (out.view(2, 7, HIDDEN) * upstream).sum().backward()
    for name, param in layer.named_parameters():
        reference = param.grad if param.grad is not None else torch.zeros_like(param)
        torch.testing.assert_close(ours[name], reference, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ours_x, x.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(ours["experts.w_in"][2] == 0)


def test_capacity_factor_drops_and_counts() -> None:
    layer = _layer(num_experts=4, top_k=1, capacity=Capacity(factor=1.0))
    x = torch.empty(8, HIDDEN)
    choice = torch.tensor([0, 0, 0, 0, 0, 1, 2, 0])  # expert 0 wants 6, capacity = ceil(1.0 * 8 / 4) = 2
    _force_router(layer, choice, x)
    with moe_context(layer) as context:
        out = layer(x)
    stats = context.stats[layer]
    assert stats.capacity == 2 and stats.dropped == 4
    assert stats.routed_counts.tolist() == [6, 1, 1, 0] and stats.kept_counts.tolist() == [2, 1, 1, 0]
    kept_rows = {0, 1, 5, 6}  # first two of expert 0 in token order, and the others
    for row in range(8):
        assert bool(out[row].abs().sum() > 0) == (row in kept_rows), row
    # dropless default keeps everything
    dropless = _layer(num_experts=4, top_k=1)
    dropless.load_state_dict(layer.state_dict())
    with moe_context(dropless) as context:
        dropless(x)
    assert context.stats[dropless].dropped == 0 and context.stats[dropless].capacity is None
    torch.testing.assert_close(dropless(x)[sorted(kept_rows)], out[sorted(kept_rows)], atol=1e-6, rtol=0)


def test_capacity_prefers_first_choices_over_second() -> None:
    layer = _layer(num_experts=2, top_k=2, capacity=Capacity(factor=0.5))  # capacity = ceil(0.5 * 4 * 2 / 2) = 2
    x = torch.empty(4, HIDDEN)
    _force_router(layer, torch.tensor([0, 0, 1, 1]), x)
    with moe_context(layer) as context:
        layer(x)
    # each expert: 2 first choices + 2 second choices routed; the first choices fill the capacity
    stats = context.stats[layer]
    assert stats.kept_counts.tolist() == [2, 2] and stats.dropped == 4
    w_first = context.routing[layer].weights[..., 0]
    manual = torch.stack(
        [layer.experts.expert_forward(int(e), x[i : i + 1])[0] * w_first[i] for i, e in enumerate([0, 0, 1, 1])]
    )
    torch.testing.assert_close(layer(x), manual, atol=1e-6, rtol=0)


def test_frozen_router_unchanged_after_optimizer_step() -> None:
    dense = _dense_ffn("llama")
    classifier = nn.Linear(HIDDEN, 4)
    moe = upcycle_ffn(
        dense, num_experts=4, top_k=1, meta=True, router_init=classifier, load_balance_coef=0.01, z_loss_coef=0.001
    )
    assert torch.equal(moe.router.linear.weight, classifier.weight)
    assert torch.equal(moe.router.linear.bias, classifier.bias)
    moe.router.requires_grad_(False)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    with moe_context(moe) as context:
        out = moe(torch.randn(2, 8, HIDDEN))
    (out.pow(2).mean() + context.aux_loss()).backward()
    optimizer.step()
    after = moe.state_dict()
    assert torch.equal(after["router.linear.weight"], before["router.linear.weight"])
    assert torch.equal(after["router.linear.bias"], before["router.linear.bias"])
    assert not torch.equal(after["experts.w_in"], before["experts.w_in"])  # the experts did train


def test_moe_from_ffns_keeps_each_source_as_its_expert() -> None:
    """MedPLIB stage IV: expert 0 from model A, expert 1 from model B."""
    ffn_a, ffn_b = _dense_ffn("phi"), tiny_lm("phi", num_layers=1, seed=7).get_decoder().layers[0].mlp
    moe = moe_from_ffns([ffn_a, ffn_b], top_k=1, meta=None)
    x = torch.randn(5, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts.expert_forward(0, x), ffn_a(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(moe.experts.expert_forward(1, x), ffn_b(x), atol=1e-6, rtol=0)
        p = (x @ moe.router.linear.weight.t() + moe.router.linear.bias).softmax(-1)  # (5, 2)
        top = p.argmax(-1)
        expected = torch.where((top == 0).unsqueeze(1), ffn_a(x), ffn_b(x)) * p.max(-1).values.unsqueeze(1)
        torch.testing.assert_close(moe(x), expected, atol=1e-6, rtol=0)


def test_router_output_fields() -> None:
    router = TopKRouter(hidden_size=HIDDEN, num_experts=5, top_k=2, renormalize=False)
    x = torch.randn(7, HIDDEN)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    out = router(x, token_mask=mask)
    assert out.weights.shape == (7, 2) and out.indices.shape == (7, 2)
    assert out.logits.shape == (7, 5) and out.probs.shape == (7, 5)
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices))
    assert int(out.counts.sum()) == 5 * 2
    renorm = TopKRouter(hidden_size=HIDDEN, num_experts=5, top_k=2, renormalize=True)
    renorm.load_state_dict(router.state_dict())
    torch.testing.assert_close(renorm(x).weights.sum(-1), torch.ones(7))
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(hidden_size=HIDDEN, num_experts=2, top_k=3)


def test_grouped_experts_rejects_wrong_shapes() -> None:
    experts = GroupedExperts(num_experts=2, hidden_size=HIDDEN, ffn_size=FFN, gated=True, bias=False, activation="silu")
    with pytest.raises(ValueError, match="expected"):
        experts.load_expert(0, w_in=torch.zeros(HIDDEN, FFN), w_out=torch.zeros(FFN, HIDDEN))
    with pytest.raises(ValueError, match="unknown activation"):
        GroupedExperts(num_experts=2, hidden_size=8, ffn_size=8, gated=True, bias=False, activation="nope")
