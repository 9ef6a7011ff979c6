"""LLaVA's conversation templates as jinja chat templates (``model.llm.conversation``).

The released LLaVA-family code (LLaVA, LLaVA-Med, MoE-LLaVA / Med-MoE, LISA / MedPLIB) does not use chat
templates: ``llava/conversation.py`` builds one prompt string per conversation with ``Conversation.get_prompt()``
from a system text, two role names, a separator style and separators. Each preset here is a chat template whose
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` is exactly that string
for ``messages`` = [system?, user, assistant, user, assistant, ...]:

| preset | reference (repository, ``conv_templates`` key) | style | system | sep, sep2 |
|---|---|---|---|---|
| ``vicuna_v1`` | LLaVA ``conv_vicuna_v1`` (``v1``, ``vicuna_v1``) | TWO | "... curious user ..." | " ", "</s>" |
| ``llava_v1`` | LLaVA ``conv_llava_v1`` (``llava_v1``) | TWO | "... curious human ..." | " ", "</s>" |
| ``llava_llama_2`` | LLaVA ``conv_llava_llama_2`` | LLAMA_2 | "You are a helpful language and ..." | "<s>", "</s>" |
| ``mistral_instruct`` | LLaVA, LLaVA-Med v1.5 ``conv_mistral_instruct`` | LLAMA_2 | none | "", "</s>" |
| ``plain`` | LLaVA ``conv_llava_plain`` through ``preprocess_plain`` | PLAIN | none | "\\n" |
| ``phi`` | MoE-LLaVA / Med-MoE ``conv_phi`` (``phi``) | TWO | "... curious user ..." | " ", "<|endoftext|>" |
| ``stablelm`` | Med-MoE ``conv_stablelm`` (``stablelm``) | TWO | "... curious user ..." | " ", "<|endoftext|>" |

The TWO presets' roles are ``USER`` / ``ASSISTANT``; LLAMA_2 writes ``[INST] ... [/INST]`` instead of roles.

Rules the templates follow (all of LLaVA's, except where said):

- A leading ``system`` message replaces the preset's system text (LLaVA: ``conv.system = ...``); ``plain`` has no
  system text and ignores one. Roles must alternate user / assistant from the first message after the system one
  (LLaVA asserts it); anything else raises a template error.
- The generation prompt is ``get_prompt()`` with the assistant's message ``None``: TWO ends in ``"ASSISTANT:"``,
  LLAMA_2 in ``"[/INST]"``, ``plain`` adds nothing. Every render is a prefix of the render with one more message
  (``datamodules/encoding.py`` ``ConversationEncoder`` tokenises the pieces between them). One render differs
  from ``get_prompt()``: a system message alone (no turn, no generation prompt) ends without TWO's ``sep``, which
  is written with the first user turn instead, so the encoder's pieces are ``"SYS"`` + ``" USER: ..."`` and no
  piece ends in a lone space (that space would be a token of its own, unlike in the whole prompt).
- LLAMA_2 wraps a non-empty system text in ``<<SYS>>\\n...\\n<</SYS>>\\n\\n`` at the start of the first user message
  (LLaVA's and LLaVA-Med's ``len(msg) > 0`` check; Med-MoE's and MedPLIB's copies wrap even an empty one, which
  no preset here uses) and drops the leading ``sep`` (``ret.lstrip(sep)``): later user turns start with ``sep``.
- ``plain`` is LLaVA's pretraining format: ``get_prompt()`` cannot render an answer for it (its ``sep2`` is None),
  so the preset renders what ``preprocess_plain`` trains on: the first user message is replaced by ``<image>``
  alone (the instruction text is dropped), the answer is followed by ``"\\n"``. One exchange only, and the user
  message must hold ``<image>`` (``preprocess_plain`` asserts both).
- BOS: LLaVA tokenises the whole prompt with the tokenizer, which prepends ``<s>`` for Llama / Vicuna / Mistral
  tokenizers and nothing for Phi-2's CodeGen or StableLM-2's tokenizer. Our encoder tokenises with
  ``add_special_tokens=False``, so the template writes ``{{ bos_token }}`` first when ``add_bos`` is true: pass
  whether the tokenizer adds a BOS (``pipeline/model_factory.py`` checks ``tokenizer("a")``). The LLAMA_2
  presets' later ``sep`` ``"<s>"`` is literal text of the reference prompt and is always written.

Pure Python, no torch / transformers (the config schema types ``model.llm.conversation`` with
``medcore.choices.ConversationPreset``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from medcore.choices import CONVERSATION_PRESETS, ConversationPreset

__all__ = ["CONVERSATION_PRESETS", "ConversationPreset", "ConversationSpec", "conversation_template", "spec"]

SeparatorStyle = Literal["TWO", "LLAMA_2", "PLAIN"]

_CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_CURIOUS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
_IMAGE = "<image>"


@dataclass(frozen=True)
class ConversationSpec:
    """The fields of a reference ``Conversation`` that ``get_prompt()`` reads."""

    style: SeparatorStyle
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    reference: str  # where the definition comes from


_SPECS: dict[str, ConversationSpec] = {
    "vicuna_v1": ConversationSpec(
        "TWO",
        _CURIOUS_USER,
        ("USER", "ASSISTANT"),
        " ",
        "</s>",
        "haotian-liu/LLaVA llava/conversation.py conv_vicuna_v1",
    ),
    "llava_v1": ConversationSpec(
        "TWO",
        _CURIOUS_HUMAN,
        ("USER", "ASSISTANT"),
        " ",
        "</s>",
        "haotian-liu/LLaVA llava/conversation.py conv_llava_v1",
    ),
    "llava_llama_2": ConversationSpec(
        "LLAMA_2",
        _LLAVA_LLAMA_2,
        ("USER", "ASSISTANT"),
        "<s>",
        "</s>",
        "haotian-liu/LLaVA llava/conversation.py conv_llava_llama_2",
    ),
    "mistral_instruct": ConversationSpec(
        "LLAMA_2",
        "",
        ("USER", "ASSISTANT"),
        "",
        "</s>",
        "microsoft/LLaVA-Med llava/conversation.py conv_mistral_instruct",
    ),
    "plain": ConversationSpec(
        "PLAIN", "", ("", ""), "\n", None, "haotian-liu/LLaVA conv_llava_plain + llava/train/train.py preprocess_plain"
    ),
    "phi": ConversationSpec(
        "TWO",
        _CURIOUS_USER,
        ("USER", "ASSISTANT"),
        " ",
        "<|endoftext|>",
        "jiangsongtao/Med-MoE moellava/conversation.py conv_phi",
    ),
    "stablelm": ConversationSpec(
        "TWO",
        _CURIOUS_USER,
        ("USER", "ASSISTANT"),
        " ",
        "<|endoftext|>",
        "jiangsongtao/Med-MoE moellava/conversation.py conv_stablelm",
    ),
}
assert tuple(_SPECS) == CONVERSATION_PRESETS, "medcore.choices.ConversationPreset and _SPECS differ"


def spec(name: ConversationPreset) -> ConversationSpec:
    """The reference conversation's fields for preset ``name``."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"conversation preset must be one of {', '.join(CONVERSATION_PRESETS)}, got {name!r}"
        ) from None


def conversation_template(name: ConversationPreset, *, add_bos: bool) -> str:
    """The jinja chat template of preset ``name``; ``add_bos``: start with ``{{ bos_token }}`` (the tokenizer
    prepends a BOS when it tokenises a whole prompt, as Llama's does)."""
    s = spec(name)
    body = {"TWO": _two, "LLAMA_2": _llama_2, "PLAIN": _plain}[s.style](s)
    return ("{{ bos_token }}" if add_bos else "") + body


# -- jinja ------------------------------------------------------------------------------------------------------
# Every text is written by an expression from a string literal: HF renders with trim_blocks / lstrip_blocks,
# which would eat newlines and spaces written as template text next to a tag.


def _lit(text: str) -> str:
    """A jinja string literal of ``text`` (JSON escapes are jinja's escapes)."""
    return json.dumps(text)


def _split_system(default: str) -> str:
    """Sets ``system`` (a leading system message, else ``default``) and ``turns`` (the other messages)."""
    return (
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
        f"{{% else %}}{{% set system = {_lit(default)} %}}{{% set turns = messages %}}{{% endif %}}"
    )


_ALTERNATE = (
    "{% if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional "
    "system message') }}{% endif %}"
)


def _two(s: ConversationSpec) -> str:
    """SeparatorStyle.TWO: system + sep, then ``role: message`` + sep (user) / sep2 (assistant); an empty
    message or the generation prompt writes ``role:``. The sep after the system text is written with what
    follows it, so a system message alone renders without it (its piece ends in no space)."""
    user, assistant = (_lit(r) for r in s.roles)
    return (
        _split_system(s.system)
        + "{{ system }}"
        + f"{{% if turns or add_generation_prompt %}}{{{{ {_lit(s.sep)} }}}}{{% endif %}}"
        + "{% for message in turns %}"
        + _ALTERNATE
        + f"{{% set role = {user} if loop.index0 % 2 == 0 else {assistant} %}}"
        + f"{{% set sep = {_lit(s.sep)} if loop.index0 % 2 == 0 else {_lit(s.sep2 or '')} %}}"
        + "{% if message['content'] %}{{ role + ': ' + message['content'] + sep }}"
        + "{% else %}{{ role + ':' }}{% endif %}"
        + "{% endfor %}"
        + f"{{% if add_generation_prompt %}}{{{{ {assistant} + ':' }}}}{{% endif %}}"
    )


def _llama_2(s: ConversationSpec) -> str:
    """SeparatorStyle.LLAMA_2: ``[INST] message [/INST]`` (the first with the wrapped system in front, later ones
    after sep), `` answer `` + sep2; the generation prompt adds nothing."""
    return (
        _split_system(s.system)
        + "{% for message in turns %}"
        + _ALTERNATE
        + "{% set content = message['content'] %}"
        + "{% if loop.first and not content %}{{ raise_exception('the first user message must not be empty') }}"
        + "{% endif %}"
        + "{% if content and loop.index0 % 2 == 0 %}"
        + "{% if loop.first and system %}"
        + f"{{% set content = {_lit('<<SYS>>' + chr(10))} + system + {_lit(chr(10) + '<</SYS>>' + chr(10) * 2)} "
        + "+ content %}"
        + "{% endif %}"
        + f"{{{{ ('' if loop.first else {_lit(s.sep)}) + '[INST] ' + content + ' [/INST]' }}}}"
        + f"{{% elif content %}}{{{{ ' ' + content + ' ' + {_lit(s.sep2 or '')} }}}}"
        + "{% endif %}"
        + "{% endfor %}"
    )


def _plain(s: ConversationSpec) -> str:
    """LLaVA's ``preprocess_plain``: ``<image>`` + answer + sep, for one exchange whose user message holds the
    image; system messages are not rendered."""
    return (
        "{% for message in messages if message['role'] != 'system' %}"
        + _ALTERNATE
        + "{% if loop.index0 > 1 %}{{ raise_exception('the plain conversation preset renders one exchange "
        "(LLaVA preprocess_plain: an image and its caption)') }}{% endif %}"
        + "{% if message['role'] == 'user' %}"
        + f"{{% if {_lit(_IMAGE)} not in message['content'] %}}{{{{ raise_exception('the plain conversation "
        "preset needs <image> in the user message') }}{% endif %}"
        + f"{{{{ {_lit(_IMAGE)} }}}}"
        + f"{{% else %}}{{{{ message['content'] + {_lit(s.sep)} }}}}{{% endif %}}"
        + "{% endfor %}"
    )
