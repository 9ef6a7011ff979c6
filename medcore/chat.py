"""Facts read off a tokenizer's chat template (duck-typed: any HF tokenizer; no imports of ours)."""

from __future__ import annotations

from typing import Any

_TURN_MARKER = "MEDPIPE_ANSWER_END"


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant answer (``<end_of_turn>``,
    ``<|im_end|>``, ``<|eot_id|>``, ``</s>``), as text; None when that is not a single special token (or the
    template cannot render a plain user/assistant exchange)."""
    conversation = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that rejects the exchange has no end-of-turn token to find
        return None
    if not isinstance(text, str) or _TURN_MARKER not in text:
        return None
    after = text.split(_TURN_MARKER, 1)[1].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(ids[0])
    if ids[0] not in tokenizer.all_special_ids and (added is None or not added.special):
        return None
    token = tokenizer.convert_ids_to_tokens(ids[0])
    return token if after.startswith(token) else None
