"""Record -> model inputs: chat template, image placeholder expansion, prompt masking."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from datamodules.problems import ProblemLog
from datamodules.prompts import PromptTemplates
from datamodules.records import Record
from medcore.chat import end_of_turn_token

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
REGION_START = "<region>"
REGION_FEAT = "<region_feat>"  # lightningmodules/models/region.py REGION_PLACEHOLDER
_IMAGE_PLACEHOLDER = re.compile(r"[ \t]*<image>[ \t]*\n?")


class PromptTooLongError(ValueError):
    """A record's prompt leaves no room for an answer within ``max_length`` tokens."""

    def __init__(self, record_id: str, tokens: int, max_length: int) -> None:
        self.tokens, self.max_length = tokens, max_length
        super().__init__(f"record {record_id}: the prompt is {tokens} tokens, {self.reason}; raise max_length")

    @property
    def reason(self) -> str:
        return (
            f"longer than data.max_length={self.max_length}"
            if self.tokens > self.max_length
            else (f"as long as data.max_length={self.max_length}, leaving no room for an answer")
        )


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

    Templates that are not prefix-stable (Qwen3 writes an empty think block only in the assistant turns
    after the last user query, so a multi-turn render is not a prefix of the next) take the path of
    :meth:`_encode_rendered_once`: the first turn's generation prompt (exactly the evaluation prompt),
    then the whole conversation rendered once, each answer and its end-of-turn token the labels.
    Every error names the record.
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
        input_ids, labels = self._encode_checked(record, with_answers=with_answers)
        image_tokens = input_ids.count(self.image_token_id)
        if record.has_image and image_tokens != self.num_image_tokens:
            raise ValueError(
                f"record {record.id}: the encoded conversation has {image_tokens} image tokens, not the "
                f"{self.num_image_tokens} of one {IMAGE_TOKEN}: the chat template does not write the first "
                "question as given"
            )
        # the prompt is everything before the first answer token (the whole sequence without answers)
        prompt = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
        self.check_prompt(record, prompt)
        truncated = len(input_ids) > self.max_length
        if truncated:  # answers may be cut (counted as truncated); the first prompt may not: it holds the image
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return EncodedSample(input_ids=input_ids, labels=labels, truncated=truncated)

    def prompt_length(self, record: Record) -> int:
        """Tokens of ``record``'s generation prompt, uncut: where its first answer starts in training."""
        return len(self._encode_checked(record, with_answers=False)[0])

    def check_prompt(self, record: Record, prompt_tokens: int) -> None:
        """A prompt must leave room for one answer token (:class:`PromptTooLongError` otherwise)."""
        if prompt_tokens >= self.max_length:
            raise PromptTooLongError(record.id, prompt_tokens, self.max_length)

    def _encode_checked(self, record: Record, *, with_answers: bool) -> tuple[list[int], list[int]]:
        from jinja2.exceptions import TemplateError

        try:
            return self._encode(record, with_answers=with_answers)
        except TemplateError as e:  # raise_exception in the template, a syntax error, an undefined name
            raise ValueError(f"record {record.id}: the chat template failed: {e}") from None

    def _encode(self, record: Record, *, with_answers: bool) -> tuple[list[int], list[int]]:
        msgs = self.messages(record, with_answers=with_answers)
        pieces = self._encode_prefixes(msgs)
        if pieces is not None:
            return pieces
        if not with_answers:  # a prompt whose system and user pieces do not render prefix by prefix
            ids = self._ids(self._render(msgs, generation_prompt=True))
            return ids, [IGNORE_INDEX] * len(ids)
        return self._encode_rendered_once(record, msgs)

    def _encode_prefixes(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]] | None:
        """Piece k is the text the template adds for message k (plus the generation prompt for users);
        None when a render is not a prefix of the next (the template is not prefix-stable)."""
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for k, msg in enumerate(msgs):
            is_user_end = msg["role"] == "user"
            text = self._render(msgs[: k + 1], generation_prompt=is_user_end)
            if not text.startswith(rendered):
                return None
            piece, rendered = text[len(rendered) :], text
            ids = self._ids(piece)
            input_ids += ids
            labels += ids if msg["role"] == "assistant" else [IGNORE_INDEX] * len(ids)
        return input_ids, labels

    def _encode_rendered_once(self, record: Record, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Training encoding for templates that are not prefix-stable: the first turn's generation prompt
        (the evaluation prompt's tokens), then the full conversation rendered once from the first answer on;
        each answer plus the end-of-turn token after it is a label, everything else is masked."""
        first = self.messages(record, with_answers=False)  # (system,) first user
        prompt_ids, prompt_labels = self._encode(record, with_answers=False)
        head = self._render(first, generation_prompt=False)  # the first user turn, closed
        prompt = self._render(first, generation_prompt=True)
        full = self._render(msgs, generation_prompt=False)
        if not (full.startswith(head) and prompt.startswith(head)):
            raise ValueError(
                f"record {record.id}: the chat template renders the first question differently in a longer "
                "conversation; set model.llm.chat_template to one that does not"
            )
        eot = self.end_of_turn
        input_ids, labels = list(prompt_ids), list(prompt_labels)
        cursor = len(head)  # every message of `first` is inside head
        masked_from = None  # start of the masked text after the previous answer (None: the prompt covers it)
        for k, msg in enumerate(msgs[len(first) :], start=len(first)):
            start, end = _find_content(full, msg["content"], cursor)
            if start < 0:
                raise ValueError(
                    f"record {record.id}: the chat template does not write message {k} ({msg['role']}) "
                    "as given; set model.llm.chat_template to one that does"
                )
            cursor = end
            if msg["role"] != "assistant":
                continue
            rest = full[end:]
            stripped = rest.lstrip()
            if eot is None or not stripped.startswith(eot):
                raise ValueError(
                    f"record {record.id}: the chat template ends answer {k} without an end-of-turn special token "
                    f"({eot or 'none found'}); set model.llm.chat_template to one that writes one"
                )
            cursor = end + len(rest) - len(stripped) + len(eot)
            if masked_from is not None:
                ids = self._ids(full[masked_from:start])
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
            ids = self._ids(full[start:cursor])
            input_ids += ids
            labels += ids
            masked_from = cursor
        ids = self._ids(full[masked_from:]) if masked_from is not None else []  # after the last answer
        return input_ids + ids, labels + [IGNORE_INDEX] * len(ids)

    @cached_property
    def end_of_turn(self) -> str | None:
        """The template's end-of-turn special token (:func:`end_of_turn_token`), found on first use."""
        return end_of_turn_token(self.tokenizer)


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


def _find_content(text: str, content: str, start: int) -> tuple[int, int]:
    """Where ``content`` is written in ``text`` from ``start`` on, as the template wrote it (verbatim, else
    stripped, as templates that trim or ``lstrip`` it do); (-1, -1) when it is not."""
    for candidate in (content, content.strip(), content.lstrip("\n")):
        at = text.find(candidate, start)
        if at >= 0:
            return at, at + len(candidate)
    return -1, -1


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


def fitting_records(
    records: list[Record],
    encoder: ConversationEncoder,
    problems: ProblemLog,
    *,
    prompts: PromptTemplates | None = None,
    every_template: bool = False,
) -> list[Record]:
    """The records whose prompt leaves room for an answer within the encoder's ``max_length``; each other one is
    a bad record (``prompt_too_long``, naming file, record and question field: raise under ``error``, count under
    ``skip``), found before training so that a loader never meets it. ``prompts``: the task templates rewrite the
    question first (``every_template``: every template a training draw may pick must fit). Prompts are encoded once
    per distinct message text, so repeated questions cost nothing."""
    lengths: dict[tuple[bool, tuple[str, ...]], int] = {}  # (has image, message texts) -> prompt tokens
    kept: list[Record] = []
    for record in records:
        variants = prompts.variants(record, every=every_template) if prompts is not None else [record]
        longest = 0
        for variant in variants:
            key = (variant.has_image, tuple(m["content"] for m in encoder.messages(variant, with_answers=False)))
            if key not in lengths:
                lengths[key] = encoder.prompt_length(variant)
            longest = max(longest, lengths[key])
        try:
            encoder.check_prompt(record, longest)
        except PromptTooLongError as e:
            source = record.source
            problems.report(
                source.file if source else f"dataset {record.dataset}",
                record.id,
                source.question_field if source else "question",
                f"the prompt is {e.tokens} tokens, {e.reason} (shorten the question or raise max_length)",
                "prompt_too_long",
            )
            continue
        kept.append(record)
    return kept
