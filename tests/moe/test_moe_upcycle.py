"""Upcycling HF causal LMs (Llama: gated, Phi: ungated with biases) and state-dict round trips."""

from __future__ import annotations

import pytest
import torch
from moe_tiny import FFN, HIDDEN, VOCAB, tiny_lm
from torch import nn

from lightningmodules.models.moe import (
    MoEContext,
    MoEFeedForward,
    attach_context,
    convert_from_sources,
    convert_to_moe,
    inspect_ffn,
    moe_context,
    moe_layers,
)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1, VOCAB, (2, 10))
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    input_ids[1, :3] = 0
    return input_ids, attention_mask


def test_inspect_ffn_detects_family(family: str) -> None:
    spec = inspect_ffn(tiny_lm(family, num_layers=1).get_decoder().layers[0].mlp)
    assert (spec.hidden_size, spec.ffn_size) == (HIDDEN, FFN)
    if family == "llama":
        assert (spec.kind, spec.gated, spec.bias, spec.activation) == ("gated", True, False, "silu")
    else:
        assert (spec.kind, spec.gated, spec.bias, spec.activation) == ("plain", False, True, "gelu_new")


def test_inspect_ffn_fused_gate_up() -> None:
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    mlp = Phi3MLP(Phi3Config(hidden_size=HIDDEN, intermediate_size=FFN, hidden_act="silu"))
    spec = inspect_ffn(mlp)
    assert (spec.kind, spec.gated, spec.activation) == ("fused", True, "silu")
    from lightningmodules.models.moe import upcycle_ffn

    moe = upcycle_ffn(mlp, num_experts=1, meta=False, renormalize=True)
    x = torch.randn(4, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x), atol=1e-6, rtol=0)


def test_inspect_ffn_rejects_unknown_layout() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 4)

    with pytest.raises(ValueError, match="cannot tell gated"):
        inspect_ffn(Odd())


def test_convert_to_moe_replaces_every_other_layer_from_zero(family: str) -> None:
    model = tiny_lm(family)
    replaced = convert_to_moe(model, num_experts=4, top_k=1)
    assert replaced == [0, 2]
    layers = model.get_decoder().layers
    assert [isinstance(layer.mlp, MoEFeedForward) for layer in layers] == [True, False, True, False]
    moe = layers[0].mlp
    assert moe.num_experts == 4 and moe.top_k == 1 and moe.meta_expert is not None
    assert not moe.router.renormalize and moe.capacity is None
    assert moe.experts.gated == (family == "llama") and moe.experts.has_bias == (family == "phi")

    explicit = tiny_lm(family)
    assert convert_to_moe(explicit, layers=[3, 1]) == [1, 3]
    assert [isinstance(layer.mlp, MoEFeedForward) for layer in explicit.get_decoder().layers] == [
        False,
        True,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="already MoE"):
        convert_to_moe(explicit, layers=[1])
    with pytest.raises(ValueError, match="subset"):
        convert_to_moe(tiny_lm(family), layers=[4])


def test_upcycled_lm_equals_dense_at_init(family: str) -> None:
    dense = tiny_lm(family)
    model = tiny_lm(family)
    convert_to_moe(model, layers="all", num_experts=4, top_k=1, meta_expert=False, renormalize=True)
    for layer in model.get_decoder().layers:  # a random router must not matter: experts are identical
        nn.init.normal_(layer.mlp.router.linear.weight, std=1.0)
    input_ids, attention_mask = _batch()
    with torch.no_grad(), moe_context(model, attention_mask) as context:
        logits_moe = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits_dense = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(logits_moe[real], logits_dense[real], atol=1e-5, rtol=0)
    routed = {tuple(stats.routed_counts.tolist()) for stats in context.stats.values()}
    assert all(sum(counts) == int(real.sum()) for counts in routed)  # padding excluded everywhere
    assert any(len([c for c in counts if c > 0]) > 1 for counts in routed)  # tokens really went to several experts


def test_state_dict_round_trip(family: str) -> None:
    model = tiny_lm(family)
    convert_to_moe(model, num_experts=4, top_k=2, renormalize=True)
    with torch.no_grad():  # make every MoE tensor distinct from a fresh conversion
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.add_(torch.randn_like(p) * 0.1)
    state = model.state_dict()
    names = [k for k in state if ".mlp." in k and k.startswith("model.layers.0.")]
    assert "model.layers.0.mlp.router.linear.weight" in names and "model.layers.0.mlp.router.linear.bias" in names
    assert "model.layers.0.mlp.experts.w_in" in names and "model.layers.0.mlp.experts.w_out" in names
    assert any(k.startswith("model.layers.0.mlp.meta_expert.") for k in names)

    fresh = tiny_lm(family, seed=99)
    convert_to_moe(fresh, num_experts=4, top_k=2, renormalize=True)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    input_ids, attention_mask = _batch()
    with torch.no_grad(), moe_context(model, attention_mask), moe_context(fresh, attention_mask):
        a = model(input_ids=input_ids, attention_mask=attention_mask).logits
        b = fresh(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_lm_training_step_collects_aux_loss_and_masks(family: str) -> None:
    model = tiny_lm(family).train()
    convert_to_moe(model, num_experts=4, top_k=1, load_balance_coef=0.01, z_loss_coef=0.001)
    input_ids, attention_mask = _batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    context = MoEContext(attention_mask)
    assert attach_context(model, context) == 2
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    aux = context.aux_loss()
    assert aux is not None and aux.requires_grad and float(aux.detach()) > 0
    (out.loss + aux).backward()
    moe = model.get_decoder().layers[0].mlp
    assert moe.router.linear.weight.grad is not None and moe.experts.w_in.grad is not None
    # a stale mask of another shape is an error, not a silent mis-route
    with pytest.raises(ValueError, match="token mask"):
        model(input_ids=input_ids[:, :5])
    attach_context(model, None)
    model(input_ids=input_ids[:, :5])


def test_convert_from_sources_medplib(family: str) -> None:
    target, source_a, source_b = tiny_lm(family), tiny_lm(family, seed=1), tiny_lm(family, seed=2)
    replaced = convert_from_sources(target, [source_a, source_b], layers="all", top_k=1)
    assert replaced == [0, 1, 2, 3]
    x = torch.randn(3, HIDDEN)
    for i, layer in enumerate(target.get_decoder().layers):
        assert layer.mlp.num_experts == 2 and layer.mlp.meta_expert is None
        with torch.no_grad():
            torch.testing.assert_close(
                layer.mlp.experts.expert_forward(0, x), source_a.get_decoder().layers[i].mlp(x), atol=1e-6, rtol=0
            )
            torch.testing.assert_close(
                layer.mlp.experts.expert_forward(1, x), source_b.get_decoder().layers[i].mlp(x), atol=1e-6, rtol=0
            )


def test_gradient_checkpointing_with_mask_kept_through_backward() -> None:
    """Checkpointed layers re-run during backward: the mask stays set until backward is done."""
    model = tiny_lm("llama").train()
    model.gradient_checkpointing_enable()
    convert_to_moe(model, num_experts=4, top_k=1)
    input_ids, attention_mask = _batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with moe_context(model, attention_mask) as context:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        (out.loss + context.aux_loss()).backward()
    assert model.get_decoder().layers[0].mlp.experts.w_in.grad is not None
    assert context.stats[model.get_decoder().layers[0].mlp].num_tokens == int(attention_mask.sum())


@pytest.mark.parametrize("other_family", ["qwen2", "stablelm"])
def test_other_gated_families_upcycle_exactly(other_family: str) -> None:
    dense, model = tiny_lm(other_family), tiny_lm(other_family)
    assert inspect_ffn(model.get_decoder().layers[0].mlp).kind == "gated"
    assert convert_to_moe(model, num_experts=3, top_k=1, meta_expert=False, renormalize=True) == [0, 2]
    input_ids, attention_mask = _batch()
    with torch.no_grad(), moe_context(model, attention_mask):
        a = model(input_ids=input_ids, attention_mask=attention_mask).logits
        b = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=0)


def test_converted_model_deepcopies_after_a_training_forward() -> None:
    import copy

    model = tiny_lm("phi").train()
    convert_to_moe(model, num_experts=2, load_balance_coef=0.1)
    input_ids, attention_mask = _batch()
    context = MoEContext(attention_mask)
    attach_context(model, context)
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert context.aux_loss().requires_grad
    twin = copy.deepcopy(model)  # e.g. EMA / stage hand-over copies; the graph tensors are not copied
    assert all(layer.moe_context is None for _, layer in moe_layers(twin))
    assert model.get_decoder().layers[0].mlp.moe_context is context  # the original keeps its step context
    assert torch.equal(twin.get_decoder().layers[0].mlp.experts.w_in, model.get_decoder().layers[0].mlp.experts.w_in)
