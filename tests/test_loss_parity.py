"""The training loss is the LLM's own loss: MultimodalLM's CE (LM head on supervised positions only, then
the family's logit transform) equals ``llm(input_ids, attention_mask, labels).loss`` for every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightningmodules.models.multimodal import IGNORE_INDEX, MultimodalLM

VOCAB = 64
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def family_config(family: str):
    import transformers

    common = {"vocab_size": VOCAB, "max_position_embeddings": 64, "pad_token_id": 0, **SIZES}
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **common)
    if family == "phi":
        return transformers.PhiConfig(partial_rotary_factor=0.5, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if family == "gemma2":
        # a small cap so soft-capping changes the loss measurably (Gemma-2 ships 30.0)
        return transformers.Gemma2Config(
            num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager", **common
        )
    if family == "cohere":
        return transformers.CohereConfig(num_key_value_heads=2, logit_scale=0.25, **common)
    raise ValueError(family)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two right-padded samples with prompt tokens unsupervised, like the collator's training batches."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 1, (2, 12), generator=generator)  # (B, T); VOCAB-1 is <image>
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 9:] = 0
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[attention_mask == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_llm(family: str) -> nn.Module:
    """A random tiny LLM of the family with logits of a few units (as trained models have), so a
    logit transform such as soft-capping is not a no-op."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(family_config(family)).eval()
    with torch.no_grad():
        llm.get_output_embeddings().weight.mul_(40.0)
    return llm


def text_only_model(llm: nn.Module) -> MultimodalLM:
    return MultimodalLM(
        vision=nn.Identity(), connector=nn.Identity(), llm=llm, image_token_id=VOCAB - 1, num_image_tokens=1
    )


@pytest.mark.parametrize("family", ["llama", "phi", "qwen2", "gemma2", "cohere"])
def test_training_loss_equals_the_llms_own_loss(family: str) -> None:
    llm = build_llm(family)
    model = text_only_model(llm)
    inputs = batch()
    with torch.no_grad():
        ours = model(**inputs).loss
        reference = llm(**inputs).loss
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (family, float(ours), float(reference))


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_the_logit_transform_matters(family: str) -> None:
    """The families with a logit transform: the raw head's CE is measurably off, so the parity above
    proves the transform is applied."""
    import torch.nn.functional as F

    llm = build_llm(family)
    model = text_only_model(llm)
    inputs = batch()
    with torch.no_grad():
        hidden = model(**inputs).hidden_states  # (B, T, D)
        reference = llm(**inputs).loss
        targets = inputs["labels"][:, 1:]  # (B, T-1)
        supervised = targets != IGNORE_INDEX
        raw = F.cross_entropy(model.lm_head()(hidden[:, :-1][supervised]).float(), targets[supervised])
    assert abs(float(raw) - float(reference)) > 1e-2
