"""Checkpoint chat templates: a system prompt for templates without a system role, the thinking switch."""

from __future__ import annotations

from pathlib import Path

from datamodules.encoding import IGNORE_INDEX, ConversationEncoder, accepts_system_role
from datamodules.records import Record

N_IMG = 2
SYSTEM = "You are a radiologist."

# Gemma-2's template in small: a system message raises, as the real one does
GEMMA_STYLE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Mistral-Instruct v0.1's template in small: roles must alternate from a user turn
MISTRAL_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
# ChatML with a system role
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3's template in small: the last answer is written after an empty think block, and with thinking off
# the generation prompt ends in that same empty block
QWEN3_STYLE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n{{ message['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def tokenizer(tiny_llama, template: str):
    from lightningmodules.models.language import load_tokenizer

    return load_tokenizer(tiny_llama, extra_special_tokens=["<image>"], chat_template=template)


def record() -> Record:
    return Record(
        id="rec-1",
        dataset="toy",
        split="train",
        question="Is there a lesion?",
        answer="Yes",
        answer_type="closed",
        task="vqa",
        image_path="img.png",
    )


def prompt_and_target(tok, enc: ConversationEncoder) -> tuple[str, str]:
    sample = enc.encode(record(), with_answers=True)
    prompt = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab == IGNORE_INDEX]
    target = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    return tok.decode(prompt), tok.decode(target)


def test_system_prompt_merged_into_first_user_turn_when_template_rejects_it(tiny_llama) -> None:
    tok = tokenizer(tiny_llama, GEMMA_STYLE)
    assert not accepts_system_role(tok)
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt=SYSTEM)
    prompt = tok.decode(enc.encode(record(), with_answers=False).input_ids)
    user = f"{SYSTEM}\n\n" + "<image>" * N_IMG + "\nIs there a lesion?"
    assert prompt == f"<s><start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
    # training renders the same prompt, the system text masked with it
    train_prompt, target = prompt_and_target(tok, enc)
    assert train_prompt == prompt
    assert target.strip() == "Yes<end_of_turn>"


def test_system_prompt_merged_for_templates_requiring_alternating_roles(tiny_llama) -> None:
    tok = tokenizer(tiny_llama, MISTRAL_STYLE)
    assert not accepts_system_role(tok)
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt=SYSTEM)
    prompt = tok.decode(enc.encode(record(), with_answers=False).input_ids)
    assert prompt == f"<s>[INST] {SYSTEM}\n\n" + "<image>" * N_IMG + "\nIs there a lesion? [/INST]"


def test_system_prompt_kept_as_system_message_when_template_accepts_it(tiny_llama) -> None:
    tok = tokenizer(tiny_llama, CHATML)
    assert accepts_system_role(tok)
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt=SYSTEM)
    prompt = tok.decode(enc.encode(record(), with_answers=False).input_ids)
    user = "<image>" * N_IMG + "\nIs there a lesion?"
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_thinking_off_by_default_keeps_think_block_out_of_targets(tiny_llama) -> None:
    tok = tokenizer(tiny_llama, QWEN3_STYLE)
    off = ConversationEncoder(tok, num_image_tokens=N_IMG)
    prompt, target = prompt_and_target(tok, off)
    # the empty think block is prompt (as at generation), never a target
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(off.encode(record(), with_answers=False).input_ids) == prompt
    assert "think>" not in target and target.strip() == "Yes<|im_end|>"
    # with thinking on, the template's empty block would be trained as part of the answer
    on = ConversationEncoder(tok, num_image_tokens=N_IMG, enable_thinking=True)
    assert "<think>" in prompt_and_target(tok, on)[1]


def test_enable_thinking_reaches_the_encoder_from_the_config(tiny_llama, tiny_clip) -> None:
    from datamodules.images import ImageTransform
    from pipeline.config import load_config
    from pipeline.runner import build_datamodule

    tok = tokenizer(tiny_llama, QWEN3_STYLE)
    transform = ImageTransform.from_pretrained(tiny_clip)
    demo = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"
    for setting in (False, True):
        cfg = load_config(demo, [f"model.llm.enable_thinking={setting}"], check_paths=False)
        dm = build_datamodule(cfg).connect(tok, transform, num_image_tokens=N_IMG)
        assert dm.encoder.enable_thinking is setting


# a template that rejects the assistant role, as a base model's template written for prompts only might
NO_ASSISTANT = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ raise_exception('Only user messages are supported') }}{% endif %}"
    "USER: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# a template that drops the user's content (and so the <image> placeholder)
NO_USER_CONTENT = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER:\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def test_template_errors_name_the_record(tiny_llama) -> None:
    import pytest

    enc = ConversationEncoder(tokenizer(tiny_llama, NO_ASSISTANT), num_image_tokens=N_IMG)
    with pytest.raises(ValueError, match="^record rec-1: the chat template failed: Only user messages are supported"):
        enc.encode(record(), with_answers=True)
    enc.encode(record(), with_answers=False)  # prompts alone render
    enc = ConversationEncoder(tokenizer(tiny_llama, NO_USER_CONTENT), num_image_tokens=N_IMG)
    for with_answers in (True, False):
        with pytest.raises(ValueError, match="^record rec-1: the encoded conversation has 0 image tokens, not the 2"):
            enc.encode(record(), with_answers=with_answers)
