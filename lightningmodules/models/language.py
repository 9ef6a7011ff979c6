"""Causal LM and tokenizer loading, special tokens and the chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medcore.chat import end_of_turn_token

IMAGE_TOKEN = "<image>"

# Used when a checkpoint's tokenizer has no chat template (Phi-2, base Llama): LLaVA's "plain
# vicuna" turn format. One template for training and evaluation, so prompts never differ.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def load_tokenizer(
    path: str | Path,
    *,
    extra_special_tokens: list[str],
    chat_template: str | None = None,
    trust_remote_code: bool = False,
):
    """Tokenizer of the LLM checkpoint with our special tokens added and a pad token ensured."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    missing = [t for t in extra_special_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(
    path: str | Path,
    *,
    vocab_size: int,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with embeddings resized to the tokenizer."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # new rows start at the mean embedding so new tokens do not perturb the LM's outputs
    return fit_vocab(model, vocab_size, mean_resizing=True)


def causal_lm_from_config(
    config,
    *,
    vocab_size: int,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The model :func:`load_causal_lm` loads, with fresh weights on the current default device (``meta``:
    shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return fit_vocab(model, vocab_size, mean_resizing=False)  # no weights to average


RESIZE_SEED = 0


def fit_vocab(model: nn.Module, vocab_size: int, *, mean_resizing: bool) -> nn.Module:
    """Grow the embeddings (and LM head) to ``vocab_size`` rows when the tokenizer has more tokens.

    transformers draws the new rows from a normal around the old rows' mean (covariance 1e-9 x theirs): the
    draw uses its own seeded RNG here, so every build of a checkpoint has the same rows, whatever ran before
    (a stage's hand-over leaves out weights it did not change, and restoring rebuilds them), and the global
    RNG the training draws from is left as it was."""
    if model.get_input_embeddings().num_embeddings < vocab_size:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(RESIZE_SEED)
            model.resize_token_embeddings(vocab_size, mean_resizing=mean_resizing)
    return model


def end_of_turn_token_id(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant answer
    (:func:`medcore.chat.end_of_turn_token`), or None."""
    token = end_of_turn_token(tokenizer)
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's stop tokens: its eos and the chat template's end-of-turn token (the model adds its
    checkpoint's eos list, :meth:`MultimodalLM.stop_token_ids`)."""
    ids = [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    return list(dict.fromkeys(i for i in ids if i is not None))


def first_stops(generated: torch.Tensor, stop_ids: list[int]) -> list[int]:
    """Per row of generated ids (B, K): the position of its first stop token, K when it has none."""
    return [next((i for i, token in enumerate(row) if token in stop_ids), len(row)) for row in generated.tolist()]


def decode_answers(tokenizer, generated: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Generated ids (B, K) -> answer texts: each row cut at its first stop token, special tokens dropped."""
    rows = generated.tolist()
    return [
        tokenizer.decode(row[:end], skip_special_tokens=True).strip()
        for row, end in zip(rows, first_stops(generated, stop_ids), strict=True)
    ]
