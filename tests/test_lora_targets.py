"""Family-neutral LoRA targets: ``lora.target_modules: [mlp]`` / ``[attention]`` resolve by structure on any
family (``pipeline.trainable.lora_targets``), LoRA lands on exactly those layers, and pre-flight (which uses
the same resolution) passes MedPLIB with Phi-2, whose FFN has no gate/up/down_proj."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

REPO = Path(__file__).resolve().parent.parent
SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# family -> (the FFN's Linear layers, the attention block's), as each transformers class names them
EXPECTED = {
    "llama": (LLAMA_MLP, LLAMA_ATTENTION),
    "phi": (["fc1", "fc2"], ["q_proj", "k_proj", "v_proj", "dense"]),
    "qwen2": (LLAMA_MLP, LLAMA_ATTENTION),
    "gemma2": (LLAMA_MLP, LLAMA_ATTENTION),
    "stablelm": (LLAMA_MLP, LLAMA_ATTENTION),
}


def tiny_llm(family: str) -> nn.Module:
    """A tiny random causal LM of the family's transformers class."""
    import transformers

    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**heads, **SIZES))
    if family == "phi":
        return transformers.PhiForCausalLM(transformers.PhiConfig(partial_rotary_factor=0.5, **heads, **SIZES))
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**heads, **SIZES))
    if family == "gemma2":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(head_dim=8, **heads, **SIZES))
    if family == "stablelm":  # per-head q / k LayerNorms inside the attention block: not LoRA targets
        return transformers.StableLmForCausalLM(transformers.StableLmConfig(qk_layernorm=True, **heads, **SIZES))
    raise ValueError(family)


def per_layer(block: str, names: list[str]) -> list[str]:
    return [f"model.layers.{i}.{block}.{name}" for i in range(SIZES["num_hidden_layers"]) for name in names]


def lora_config(*targets: str):
    return OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": list(targets)})


def adapted(model) -> list[str]:
    """Names (relative to the plain LLM) of the modules that got LoRA adapters, in model order."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, m in model.llm.named_modules() if isinstance(m, LoraLayer)]


class Wrapper(nn.Module):
    """What ``add_lora`` needs of the multimodal model: an ``llm`` attribute."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_aliases_resolve_to_the_familys_layers(family: str) -> None:
    from pipeline.trainable import lora_targets

    llm = tiny_llm(family)
    mlp, attention = EXPECTED[family]
    assert lora_targets(llm, ["mlp"]) == per_layer("mlp", mlp)
    assert lora_targets(llm, ["attention"]) == per_layer("self_attn", attention)
    assert lora_targets(llm, ["attention", "mlp"]) == per_layer("self_attn", attention) + per_layer("mlp", mlp)
    assert lora_targets(llm, ["all-linear"]) == "all-linear"
    assert lora_targets(llm, ["mlp", mlp[0]]) == [*per_layer("mlp", mlp), mlp[0]]  # names mix with the aliases


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_lora_lands_on_exactly_the_resolved_layers(family: str) -> None:
    from pipeline.trainable import add_lora, lora_targets, merge_lora

    mlp, attention = EXPECTED[family]
    model = Wrapper(tiny_llm(family))
    resolved = lora_targets(model.llm, ["mlp"])
    add_lora(model, lora_config("mlp"))
    assert adapted(model) == resolved == per_layer("mlp", mlp)
    merge_lora(model)
    add_lora(model, lora_config("attention"))
    assert adapted(model) == per_layer("self_attn", attention)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # peft sets it for Conv1D itself
def test_gpt2_names_its_blocks_differently() -> None:
    """GPT-2: decoder layers under ``h``, ``attn`` / ``mlp`` blocks of Conv1D layers, c_proj in both blocks:
    the aliases give full names, so ``mlp`` does not reach the attention's c_proj."""
    import transformers

    from pipeline.trainable import add_lora, lora_targets

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = Wrapper(transformers.GPT2LMHeadModel(config))
    mlp = [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert lora_targets(model.llm, ["mlp"]) == mlp
    attention = [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    assert lora_targets(model.llm, ["attention"]) == attention
    add_lora(model, lora_config("mlp"))
    assert adapted(model) == mlp


def test_unrecognised_structures_fail_clearly() -> None:
    from lightningmodules.models.moe import convert_to_moe
    from pipeline.trainable import LoraTargetError, lora_targets

    llm = tiny_llm("llama")
    convert_to_moe(llm, layers=[1], num_experts=2)  # layer 1's FFN: stacked expert weights, no Linear layers
    with pytest.raises(LoraTargetError, match=r"^mlp: decoder layer 1's mlp \(MoEFeedForward\) is not a block of"):
        lora_targets(llm, ["mlp"])
    assert lora_targets(llm, ["attention"]) == per_layer("self_attn", LLAMA_ATTENTION)  # the attention still is

    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LoraTargetError, match=r"^NoLayers: no decoder layers found"):
        lora_targets(NoLayers(), ["mlp"])
    assert lora_targets(NoLayers(), ["proj"]) == ["proj"]
    with pytest.raises(LoraTargetError, match=r"^all-linear stands alone \(got all-linear, mlp\)$"):
        lora_targets(tiny_llm("phi"), ["all-linear", "mlp"])


def test_phi_style_llm_passes_preflight_with_mlp_and_fails_with_llama_names(tmp_path: Path, cache_dir: Path) -> None:
    """The demo's LoRA stage on tiny:phi: ``mlp`` resolves (fc1 / fc2), Llama's FFN names do not."""
    from pipeline.config import load_config
    from pipeline.preflight import PreflightError, preflight

    def demo(*targets: str):
        overrides = ["model.llm.path=tiny:phi", f"stages.instruct.lora.target_modules=[{','.join(targets)}]"]
        return load_config(REPO / "experiments" / "demo.yaml", [f"output_dir={tmp_path}/out", *overrides])

    preflight(demo("mlp"))
    preflight(demo("attention", "mlp"))
    with pytest.raises(PreflightError, match=r"^stages.instruct.lora.target_modules: gate_proj not in the LLM"):
        preflight(demo("gate_proj"))


def test_medplib_with_phi2_passes_preflight(tmp_path: Path) -> None:
    """MedPLIB's stage III targets ``mlp``: on Phi-2 (paper size, meta device) that is fc1 / fc2, and every
    stage, stage IV's two-expert MoE from those FFNs included, resolves."""
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    cfg = load_config(
        REPO / "experiments" / "medplib" / "medplib.yaml",
        ["model.llm.path=/models/phi-2", f"output_dir={tmp_path}/out"],
        check_paths=False,
    )
    assert list(cfg.stages.grounding_expert.lora.target_modules) == ["mlp"]
    preflight(cfg, checkpoints=False)
