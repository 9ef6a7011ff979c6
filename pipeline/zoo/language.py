"""``tiny:llama`` / ``qwen2`` / ``phi`` / ``stablelm``: 2-layer causal LMs over the tiny tokenizer; llama is
pretrained on the synthetic corpus (answer-only next-token loss)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pipeline.zoo.corpus import encode_corpus, synthetic_corpus
from pipeline.zoo.pretrain import pretrain
from pipeline.zoo.tokenizer import load_tiny_tokenizer

log = logging.getLogger(__name__)


def lm_config(family: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(num_key_value_heads=8, **common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(num_key_value_heads=8, **common)
    if family == "phi":
        from transformers import PhiConfig

        return PhiConfig(partial_rotary_factor=0.5, **common)
    if family == "stablelm":
        from transformers import StableLmConfig

        return StableLmConfig(num_key_value_heads=8, partial_rotary_factor=0.25, **common)
    raise ValueError(family)


def pretrain_lm(
    model: nn.Module, tokenizer, *, steps: int, seed: int = 0, peak_lr: float = 3e-3, batch_size: int = 64
) -> float:
    """Answer-only next-token training on the corpus; returns held-out accuracy of the first answer token."""
    torch.manual_seed(seed)
    ids, mask, labels = encode_corpus(tokenizer, synthetic_corpus(1000))
    val_ids, val_mask, val_labels = encode_corpus(tokenizer, synthetic_corpus(150, seed=321))

    def batch_loss(idx: torch.Tensor, _step: int) -> torch.Tensor:
        return model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss

    model.train()
    pretrain(
        model.parameters(),
        batch_loss,
        steps=steps,
        n_items=ids.shape[0],
        batch_size=batch_size,
        peak_lr=peak_lr,
        seed=seed,
    )
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=val_ids, attention_mask=val_mask).logits  # (N, T, V)
    first = (val_labels != -100).float().argmax(1)  # (N,) position of the first answer token
    rows = torch.arange(val_ids.shape[0])
    predicted = logits[rows, first - 1].argmax(-1)
    accuracy = float((predicted == val_ids[rows, first]).float().mean())
    log.info("tiny LM pretrained for %d steps; held-out first-answer-token accuracy %.3f", steps, accuracy)
    return accuracy


def lm_builder(family: str, pretrain_steps: int) -> Callable[[Path, Path], None]:
    def build(out: Path, cache: Path) -> None:
        from transformers import AutoModelForCausalLM

        tokenizer = load_tiny_tokenizer(cache)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(lm_config(family, len(tokenizer)))
        if pretrain_steps > 0:
            pretrain_lm(model, tokenizer, steps=pretrain_steps)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build
