"""The tiny language models' text: (prompt, answer) pairs from the phantom generator, and their encoding."""

from __future__ import annotations

import numpy as np
import torch


def synthetic_corpus(n_phantoms: int = 1500, seed: int = 123) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the phantom generator, for the tiny tokenizer and LMs.

    The prompt starts with the phantom's report, standing in for the image: the LM learns to
    answer questions from a description in its context and to repeat the description when asked.
    LLaVA-style alignment then teaches the connector to put the image's content where those words
    were, and the LM's skills carry over to images.
    """
    from datamodules.synthetic.phantoms import make_phantom
    from datamodules.synthetic.questions import CAPTION_PROMPTS, phantom_questions, report_text

    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    for i in range(n_phantoms):
        p = make_phantom(i, seed=seed, size=32)  # attributes only; pixels are not used
        report = report_text(p)
        pairs += [(f"{report}\n{qa.question}", qa.answer) for qa in phantom_questions(p, rng, 6)]
        pairs.append((f"{report}\n{CAPTION_PROMPTS[i % len(CAPTION_PROMPTS)]}", report))
    return pairs


def encode_corpus(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chat-formatted (prompt, answer) pairs -> ids, attention mask and answer-only labels."""
    ids, labels = [], []
    for prompt, answer in pairs:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
        )
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
        ids.append(head_ids + tail_ids)
        labels.append([-100] * len(head_ids) + tail_ids)
    longest = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (longest - len(x)) for x in ids])  # (N, T)
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in ids])  # (N, T)
    label_ids = torch.tensor([y + [-100] * (longest - len(y)) for y in labels])  # (N, T)
    return input_ids, mask, label_ids
