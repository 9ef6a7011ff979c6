"""Record -> model inputs: chat template, image placeholder expansion, prompt masking."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from datamodules.records import Record

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
REGION_START = "<region>"
REGION_FEAT = "<region_feat>"  # lightningmodules/models/region.py REGION_PLACEHOLDER
_IMAGE_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?")


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


class ConversationEncoder:
    """Tokenises a record's conversation with the LLM's chat template.

    The template is rendered for growing prefixes of the conversation; each new piece of text is
    tokenised on its own, so the prompt tokens at evaluation are exactly the prompt tokens seen in
    training. Assistant pieces are the labels; everything else is masked with -100. The ``<image>``
    placeholder is expanded to ``num_image_tokens`` copies for the model to fill with visual tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_image_tokens: int,
        max_length: int = 512,
        system_prompt: str | None = None,
        task_prefix: bool = False,
        enable_thinking: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.task_prefix = task_prefix
        # Qwen3-style switch, passed to every template (those without it ignore it)
        self.enable_thinking = enable_thinking
        # Gemma-2 and Mistral-Instruct templates raise on a system message: it goes into the first user turn
        self.merge_system_prompt = bool(system_prompt) and not accepts_system_role(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_TOKEN} token; load it with load_tokenizer()")
        # MedPLIB region prompts: one placeholder after each <region>, for the model's region token
        self.region_start_id = _special_id(tokenizer, REGION_START)
        self.region_feat_id = _special_id(tokenizer, REGION_FEAT)

    def messages(self, record: Record, *, with_answers: bool) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        if self.system_prompt and not self.merge_system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        for i, turn in enumerate(record.turns if with_answers else record.turns[:1]):
            question = _IMAGE_PLACEHOLDER.sub(" ", turn.question).strip()
            if i == 0:
                if self.task_prefix:
                    question = f"[{record.task}] {question}"
                if record.has_image:
                    question = f"{IMAGE_TOKEN}\n{question}"
                if self.merge_system_prompt:
                    question = f"{self.system_prompt}\n\n{question}"
            msgs.append({"role": "user", "content": question})
            if with_answers:
                msgs.append({"role": "assistant", "content": turn.answer})
        return msgs

    def _render(self, msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=self.enable_thinking
        )

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
            if t == self.region_start_id and self.region_feat_id is not None:
                out.append(self.region_feat_id)  # <region><region_feat></region>
        return out

    def encode(self, record: Record, *, with_answers: bool) -> EncodedSample:
        """Training (``with_answers``) or generation-prompt encoding of one record."""
        msgs = self.messages(record, with_answers=with_answers)
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        # piece k is the text the template adds for message k (plus the generation prompt for users)
        for k, msg in enumerate(msgs):
            is_user_end = msg["role"] == "user"
            text = self._render(msgs[: k + 1], generation_prompt=is_user_end)
            if not text.startswith(rendered):
                raise ValueError(
                    "the chat template does not render conversations prefix by prefix; "
                    "set model.llm.chat_template to one that does"
                )
            piece, rendered = text[len(rendered) :], text
            ids = self._ids(piece)
            input_ids += ids
            labels += ids if msg["role"] == "assistant" else [IGNORE_INDEX] * len(ids)
        truncated = len(input_ids) > self.max_length
        if truncated:
            # answers may be cut (counted as truncated); the first prompt may not: it holds the image
            first_target = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
            if not with_answers or first_target >= self.max_length:
                raise ValueError(
                    f"record {record.id}: the prompt is {first_target} tokens, longer than "
                    f"data.max_length={self.max_length}; raise max_length"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return EncodedSample(input_ids=input_ids, labels=labels, truncated=truncated)


def accepts_system_role(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a system message; Gemma-2's and Mistral-Instruct's
    raise a template error instead ("System role not supported", "Conversation roles must alternate")."""
    from jinja2.exceptions import TemplateError

    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    try:
        tokenizer.apply_chat_template(conversation, tokenize=False)
    except TemplateError:
        return False
    return True


def _special_id(tokenizer: Any, token: str) -> int | None:
    """The id of an added special token, or None when the tokenizer does not have it."""
    if token not in tokenizer.get_vocab():
        return None
    return tokenizer.convert_tokens_to_ids(token)


def pad_batch(sequences: list[list[int]], pad_value: int, side: str) -> torch.Tensor:
    """(B, T_max) tensor, padded on ``side`` ("right" for training, "left" for generation)."""
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, longest - len(s) :] = torch.tensor(s, dtype=torch.long)
    return out
