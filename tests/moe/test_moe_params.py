"""count_parameters against a hand computation."""

from __future__ import annotations

from moe_tiny import FFN, HIDDEN, VOCAB, tiny_lm

from lightningmodules.models.moe import convert_to_moe, count_parameters


def test_count_parameters_llama_med_moe_layout() -> None:
    model = tiny_lm("llama")  # 4 layers, untied embeddings
    dense_total = sum(p.numel() for p in model.parameters())
    ffn = 3 * HIDDEN * FFN  # gate, up, down; no bias
    router = HIDDEN * 4 + 4
    assert convert_to_moe(model, num_experts=4, top_k=1, meta_expert=True) == [0, 2]
    counts = count_parameters(model)
    # each MoE layer adds a router and 4 expert copies; the dense FFN stays as the meta expert
    assert counts["total"] == dense_total + 2 * (router + 4 * ffn)
    assert counts["active_per_token"] == dense_total + 2 * (router + 1 * ffn)
    assert counts["experts_total"] == 2 * 4 * ffn and counts["experts_active"] == 2 * ffn
    assert counts["meta_experts"] == 2 * ffn and counts["routers"] == 2 * router and counts["moe_layers"] == 2
    assert counts["embeddings"] == 2 * VOCAB * HIDDEN  # input + LM head, both counted in total and active
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_count_parameters_phi_top2_no_meta() -> None:
    model = tiny_lm("phi")
    dense_total = sum(p.numel() for p in model.parameters())
    ffn = HIDDEN * FFN + FFN + FFN * HIDDEN + HIDDEN  # fc1, fc2 with biases
    router = HIDDEN * 4 + 4
    convert_to_moe(model, layers="all", num_experts=4, top_k=2, meta_expert=False)
    counts = count_parameters(model)
    assert counts["total"] == dense_total + 4 * (router + 3 * ffn)  # 4 copies replace the 1 dense FFN
    assert counts["active_per_token"] == dense_total + 4 * (router + 1 * ffn)  # 2 of 4 active
    assert counts["active_fraction"] == counts["active_per_token"] / counts["total"]


def test_dense_model_is_fully_active() -> None:
    model = tiny_lm("llama")
    counts = count_parameters(model)
    assert counts["total"] == counts["active_per_token"] == sum(p.numel() for p in model.parameters())
    assert counts["moe_layers"] == 0
