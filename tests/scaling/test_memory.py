"""``medpipe memory``: exact parameter counts of each stage's model built on the meta device, hand-checked bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.memory import StageCounts, stage_counts, stage_memory

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
DEMO = EXPERIMENTS / "demo.yaml"
MED_MOE_TINY = EXPERIMENTS / "med_moe" / "tiny.yaml"


def test_counts_equal_the_real_tiny_models(tiny_llama, tiny_clip) -> None:
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    cfg = load_config(DEMO, [], check_paths=False)  # tiny CLIP + tiny Llama; align: connector, instruct: + LoRA r16
    align = stage_counts(cfg, "align")
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama)
    vision = CLIPVisionModel.from_pretrained(tiny_clip)
    h = llm.config.hidden_size
    connector = 64 * h + h + h * h + h  # mlp2x_gelu from the 64-wide tiny CLIP
    assert align.parts["llm"] == sum(p.numel() for p in llm.parameters())
    assert align.parts["vision"] == sum(p.numel() for p in vision.parameters())
    assert align.parts["connector"] == connector
    assert align.total == sum(align.parts.values())
    dense = sum(p.numel() for p in llm.parameters()) + sum(p.numel() for p in vision.parameters())
    assert align.total == dense + connector
    assert align.ffn_scale == 1  # no MoE layer: one FFN per token and layer
    assert align.trainable == connector
    assert align.layers == llm.config.num_hidden_layers and align.hidden == h and align.vocab == llm.config.vocab_size
    # LoRA r on every Linear but lm_head: r * (in + out) each
    from torch import nn

    r = cfg.stages.instruct.lora.r
    lora = sum(
        r * (m.in_features + m.out_features)
        for n, m in llm.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in n
    )
    instruct = stage_counts(cfg, "instruct")
    assert instruct.trainable == connector + lora
    assert instruct.total == align.total + lora


def test_stage_bytes_by_hand() -> None:
    counts = StageCounts(total=1_000, trainable=900, layers=4, hidden=8, vocab=10)  # connector 100 + llm 800
    gb = 1024**3
    full = stage_memory(
        counts,
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
        devices=4,
        strategy="deepspeed_stage_2",
        micro_batch=2,
        seq_len=16,
        answer_tokens=3,
    )
    assert sharded["weights_gb"] == full["weights_gb"]
    assert sharded["gradients_gb"] == pytest.approx(full["gradients_gb"] / 4)
    assert sharded["optimizer_gb"] == pytest.approx(full["optimizer_gb"] / 4)
    fsdp = stage_memory(
        StageCounts(total=1_000, trainable=800, layers=4, hidden=8, vocab=10),
        devices=4,
        strategy="fsdp",
        precision="bf16-true",
    )
    assert fsdp["weights_gb"] * gb == pytest.approx(1_000 * 2 / 4)


def test_moe_stage_bytes_by_hand(tiny_llama, tiny_clip) -> None:
    """The tiny Med-MoE's stage 3, counted by ``stage_counts`` on the model built from its YAML, against the
    counts by hand: every other layer of 2 (layer 0) -> 3 upcycled experts + the meta expert (the dense FFN)
    + a router Linear(h, 3); the router stage added the modality classifier Linear(h, 3); stage 3 trains the
    connector and every FFN (experts, meta expert, the dense layer's FFN), routers frozen."""
    from transformers import AutoConfig

    llm = AutoConfig.from_pretrained(tiny_llama)
    h, layers = llm.hidden_size, llm.num_hidden_layers
    ffn = 3 * h * llm.intermediate_size  # gate, up, down (no bias)
    linear = h * 3 + 3  # Linear(h, 3): the router of the MoE layer, the modality classifier
    cfg = load_config(MED_MOE_TINY, [], check_paths=False)
    dense, counts = stage_counts(cfg, "stage1"), stage_counts(cfg, "stage3")  # stage 1 trains the connector
    assert layers == 2 and dense.ffn_scale == 1
    assert counts.total == dense.total + linear + (3 * ffn + linear)
    assert counts.trainable == dense.trainable + layers * ffn + 3 * ffn
    assert counts.ffn_scale == 2  # top-1 + the meta expert
    gb = 1024**3
    moe = stage_memory(counts, devices=1, micro_batch=2, seq_len=16, answer_tokens=0)
    assert moe["params_total"] * 1e9 == pytest.approx(dense.total + linear + 3 * ffn + linear)
    assert moe["params_trainable"] * 1e9 == pytest.approx(dense.trainable + layers * ffn + 3 * ffn)
    assert moe["weights_gb"] * gb == pytest.approx(counts.total * 4)  # fp32 under bf16-mixed
    assert moe["optimizer_gb"] * gb == pytest.approx(counts.trainable * 8)
    # the FFN's 19 s b h of each layer's 34 s b h scaled by k + meta = 2
    assert moe["activations_gb"] * gb == pytest.approx(((34 - 19) + 19 * 2) * 16 * 2 * h * layers)


def test_memory_command_json(capsys) -> None:
    from pipeline.cli import main

    assert main(["memory", "--recipe", "med_moe_stablelm", "--json", "--gradient-checkpointing"]) == 0
    table = json.loads(capsys.readouterr().out)["med_moe_stablelm"]
    assert list(table) == ["stage1", "stage2", "router", "stage3"]  # experiments/med_moe/med_moe.yaml's stages
    # StableLM-2-1.6B + CLIP ViT-L/14-336 + connector: about 1.95 B parameters
    assert 1.9 < table["stage2"]["params_total"] < 2.0
    assert table["stage3"]["params_total"] > table["stage2"]["params_total"]  # upcycled experts
