"""Multi-turn conversations under Qwen3's real chat template, which is not prefix-stable: an assistant turn
gets the empty ``<think>`` block only after the last user query, so the render of a conversation is not a
prefix of the render with one more user turn. ``ConversationEncoder`` then renders the conversation once."""

from __future__ import annotations

import pytest
from test_encoding import label_spans

from datamodules.encoding import IGNORE_INDEX, ConversationEncoder
from datamodules.records import Record, Turn
from medcore.chat import end_of_turn_token

N_IMG = 3

# Qwen/Qwen3-0.6B tokenizer_config.json "chat_template", verbatim
QWEN3_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    "                {{- tool_call.name }}\n"
    '                {{- \'", "arguments": \' }}\n'
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CORPUS = [
    "user assistant system Is there a lesion? Yes No Which organ is it? the liver Is the answer yes? yes",
    "How large is it? about two centimetres. You are a radiologist. left lung right kidney",
] * 4
TURNS = [
    Turn("Is there a lesion?", "Yes"),
    Turn("Is the answer yes?", "yes"),  # the answer also appears in the question: labels must find the answer
    Turn("How large is it?", "about two centimetres"),
]
THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE with Qwen's special tokens (``<think>`` / ``</think>`` added, not special, as in
    Qwen3) and the real Qwen3 template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>"],
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_TEMPLATE
    return tokenizer


def record(turns: list[Turn], *, image: bool = True, rid: str = "conv-7") -> Record:
    return Record(
        id=rid,
        dataset="toy",
        split="train",
        question=turns[0].question,
        answer=turns[0].answer,
        answer_type="open",
        task="qa",
        image_path="img.png" if image else None,
        turns=list(turns),
    )


def prefix_reference(enc: ConversationEncoder, tok, rec: Record) -> tuple[list[int], list[int]]:
    """The prefix-by-prefix encoding as it was before the rendered-once path existed."""
    msgs = enc.messages(rec, with_answers=True)
    ids, labels, rendered = [], [], ""
    for k, msg in enumerate(msgs):
        text = tok.apply_chat_template(
            msgs[: k + 1], tokenize=False, add_generation_prompt=msg["role"] == "user", enable_thinking=False
        )
        assert text.startswith(rendered)
        piece, rendered = text[len(rendered) :], text
        piece_ids = []
        for t in tok(piece, add_special_tokens=False)["input_ids"]:
            piece_ids += [t] * N_IMG if t == enc.image_token_id else [t]
        ids += piece_ids
        labels += piece_ids if msg["role"] == "assistant" else [IGNORE_INDEX] * len(piece_ids)
    return ids, labels


def test_the_template_is_not_prefix_stable_for_three_turns(tok) -> None:
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    two = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
    three = tok.apply_chat_template(
        [*msgs, {"role": "user", "content": "Q2"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert THINK in two and not three.startswith(two)  # the history answer loses its think block
    assert end_of_turn_token(tok) == "<|im_end|>"


def test_three_turn_record_labels_each_answer_and_its_end_of_turn(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=512)
    rec = record(TURNS)
    assert enc._encode_prefixes(enc.messages(rec, with_answers=True)) is None  # the rendered-once path
    sample = enc.encode(rec, with_answers=True)
    assert not sample.truncated and len(sample.input_ids) == len(sample.labels)
    assert label_spans(tok, sample.input_ids, sample.labels) == [f"{t.answer}<|im_end|>" for t in TURNS]
    supervised = [t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE_INDEX]
    assert "<think>" not in tok.decode(supervised) and "think>" not in tok.decode(supervised)
    assert enc.image_token_id not in supervised
    # the first turn as generation renders it, then the conversation as the template renders it
    image = "<image>" * N_IMG
    assert tok.decode(sample.input_ids) == (
        f"<|im_start|>user\n{image}\nIs there a lesion?<|im_end|>\n<|im_start|>assistant\n{THINK}Yes<|im_end|>\n"
        "<|im_start|>user\nIs the answer yes?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
        f"<|im_start|>user\nHow large is it?<|im_end|>\n<|im_start|>assistant\n{THINK}about two centimetres"
        "<|im_end|>\n"
    )
    assert sample.input_ids.count(enc.image_token_id) == N_IMG


def test_first_turn_generation_prompt_is_the_training_prefix(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG)
    rec = record(TURNS)
    train = enc.encode(rec, with_answers=True)
    gen = enc.encode(rec, with_answers=False)
    n = len(gen.input_ids)
    assert train.input_ids[:n] == gen.input_ids
    assert all(lab == IGNORE_INDEX for lab in train.labels[:n]) and train.labels[n] != IGNORE_INDEX
    assert tok.decode(gen.input_ids).endswith(f"<|im_start|>assistant\n{THINK}")
    assert gen.input_ids == enc.encode(record(TURNS[:1]), with_answers=False).input_ids


def test_single_turn_ids_are_the_prefix_by_prefix_ids(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG)
    for rec in (record(TURNS[:1]), record(TURNS[:1], image=False)):
        sample = enc.encode(rec, with_answers=True)
        assert (sample.input_ids, sample.labels) == prefix_reference(enc, tok, rec)
        assert label_spans(tok, sample.input_ids, sample.labels) == ["Yes<|im_end|>\n"]


def test_thinking_on_and_a_system_prompt(tok) -> None:
    """With thinking on the last answer's empty think block is the template's, masked; the system message
    stays a system message (Qwen3 accepts one) and is masked too."""
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt="You are a radiologist.", enable_thinking=True)
    sample = enc.encode(record(TURNS), with_answers=True)
    assert label_spans(tok, sample.input_ids, sample.labels) == [f"{t.answer}<|im_end|>" for t in TURNS]
    text = tok.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a radiologist.<|im_end|>\n<|im_start|>user\n")
    assert text.count("<think>") == 1  # the last answer's, as the template writes it
    gen = enc.encode(record(TURNS), with_answers=False)
    assert sample.input_ids[: len(gen.input_ids)] == gen.input_ids


def test_two_turn_text_record_and_truncation(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG)
    full = enc.encode(record(TURNS[:2], image=False), with_answers=True)
    assert label_spans(tok, full.input_ids, full.labels) == ["Yes<|im_end|>", "yes<|im_end|>"]
    prompt = len(enc.encode(record(TURNS[:2], image=False), with_answers=False).input_ids)
    cut = ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=prompt + 2).encode(
        record(TURNS[:2], image=False), with_answers=True
    )
    assert cut.truncated and cut.input_ids == full.input_ids[: prompt + 2]
    with pytest.raises(ValueError, match="record conv-7: the prompt is"):
        ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=4).encode(record(TURNS), with_answers=True)


def test_a_template_without_an_end_of_turn_token_fails_naming_the_record(tok) -> None:
    """Not prefix-stable and no special token after an answer: the encoder cannot tell where answers end."""
    from transformers import PreTrainedTokenizerFast

    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, additional_special_tokens=["<image>"])
    other.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}A: {{ m.content }}\n"
        "{% elif m.role == 'assistant' %}A (last): {{ m.content }}\n{% else %}U: {{ m.content }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}A (last):{% endif %}"
    )
    enc = ConversationEncoder(other, num_image_tokens=N_IMG)
    with pytest.raises(ValueError, match="record conv-7: .*end-of-turn"):
        enc.encode(record(TURNS), with_answers=True)
