"""``medpipe memory``: exact parameter counts from configs on the meta device, hand-checked bytes."""

from __future__ import annotations

import json

import pytest

from pipeline.memory import ModelCounts, count_model, lora_params, stage_memory


def test_counts_equal_the_real_tiny_models(tiny_llama, tiny_clip) -> None:
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    counts = count_model(str(tiny_llama), str(tiny_clip), None, connector_in=64, connector="mlp")
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    vision = CLIPVisionModel.from_pretrained(tiny_clip)
    assert counts.llm == sum(p.numel() for p in llm.parameters())
    assert counts.vision == sum(p.numel() for p in vision.parameters())
    h = llm.config.hidden_size
    assert counts.connector == 64 * h + h + h * h + h  # mlp2x_gelu
    assert counts.ffn_per_layer == sum(p.numel() for p in llm.model.layers[0].mlp.parameters())
    # LoRA r on every Linear but lm_head: r * (in + out) each
    from torch import nn

    expected = sum(
        8 * (m.in_features + m.out_features)
        for n, m in llm.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in n
    )
    assert lora_params(counts.linear_shapes, 8) == expected


def test_stage_bytes_by_hand() -> None:
    counts = ModelCounts(total=1_000, llm=800, ffn_per_layer=50, layers=4, hidden=8, vocab=10, connector=100)
    gb = 1024**3
    full = stage_memory(
        counts,
        {"train": ["connector", "llm"]},
        devices=4,
        strategy="ddp",
        precision="bf16-mixed",
        micro_batch=2,
        seq_len=16,
        answer_tokens=3,
    )
    assert full["weights_gb"] * gb == pytest.approx(1_000 * 4)
    assert full["gradients_gb"] * gb == pytest.approx(900 * 4)
    assert full["optimizer_gb"] * gb == pytest.approx(900 * 8)
    # activations: 34 s b h per layer + logits b t V 4
    assert full["activations_gb"] * gb == pytest.approx(34 * 16 * 2 * 8 * 4 + 2 * 3 * 10 * 4)
    sharded = stage_memory(
        counts,
        {"train": ["connector", "llm"]},
        devices=4,
        strategy="deepspeed_stage_2",
        micro_batch=2,
        seq_len=16,
        answer_tokens=3,
    )
    assert sharded["weights_gb"] == full["weights_gb"]
    assert sharded["gradients_gb"] == pytest.approx(full["gradients_gb"] / 4)
    assert sharded["optimizer_gb"] == pytest.approx(full["optimizer_gb"] / 4)
    fsdp = stage_memory(counts, {"train": ["llm"]}, devices=4, strategy="fsdp", precision="bf16-true")
    assert fsdp["weights_gb"] * gb == pytest.approx(1_000 * 2 / 4)
    # MoE: every 2nd layer of 4 gets 4 experts + meta -> 2 layers x 4 extra FFNs; FFN activations x (k + meta)
    moe = stage_memory(
        counts,
        {"train": ["ffn"], "moe": {"num_experts": 4, "top_k": 1, "meta": True, "every": 2}},
        micro_batch=2,
        seq_len=16,
        answer_tokens=0,
    )
    assert moe["params_total"] * 1e9 == pytest.approx(1_000 + 2 * 4 * 50 + 2 * 9 * 4)
    assert moe["params_trainable"] * 1e9 == pytest.approx(4 * 50 + 2 * 4 * 50)
    assert moe["activations_gb"] * gb == pytest.approx(((34 - 19) + 19 * 2) * 16 * 2 * 8 * 4)


def test_memory_command_json(capsys) -> None:
    from pipeline.cli import main

    assert main(["memory", "--recipe", "med_moe_stablelm", "--json", "--gradient-checkpointing"]) == 0
    table = json.loads(capsys.readouterr().out)["med_moe_stablelm"]
    assert list(table) == ["stage1", "stage2", "stage3"]
    # StableLM-2-1.6B + CLIP ViT-L/14-336 + connector: about 1.95 B parameters
    assert 1.9 < table["stage2"]["params_total"] < 2.0
    assert table["stage3"]["params_total"] > table["stage2"]["params_total"]  # upcycled experts
