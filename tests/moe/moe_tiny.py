"""Tiny HF causal LMs for the MoE tests, built from config classes (no downloads)."""

from __future__ import annotations

import torch

HIDDEN, FFN, VOCAB = 64, 128, 100


def tiny_lm(family: str, *, num_layers: int = 4, seed: int = 0):
    """A randomly initialised tiny Llama / Qwen2 / StableLM (gated FFN) or Phi (ungated, biases), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **common))
    elif family == "phi":
        model = PhiForCausalLM(PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common))
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif family == "stablelm":
        from transformers import StableLmConfig, StableLmForCausalLM

        model = StableLmForCausalLM(StableLmConfig(num_key_value_heads=4, partial_rotary_factor=0.25, **common))
    else:
        raise ValueError(family)
    return model.eval()
