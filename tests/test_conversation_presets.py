"""LLaVA conversation presets (medcore/conversations.py, ``model.llm.conversation``) against an independent
re-implementation of the released ``Conversation.get_prompt()``.

The reference below is re-typed from haotian-liu/LLaVA ``llava/conversation.py`` (the TWO, LLAMA_2 and PLAIN
separator styles; LLaVA-Med v1.5's and Med-MoE's copies agree on what the presets use) and ``llava/train/
train.py`` (``preprocess_plain``, ``preprocess_v1``'s label masking), with each preset's fields typed again
here rather than read from medcore.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from datamodules.encoding import IGNORE_INDEX, ConversationEncoder
from datamodules.records import Record, Turn
from medcore.conversations import CONVERSATION_PRESETS, conversation_template

# -- the reference -------------------------------------------------------------------------------------------

CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CURIOUS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass
class Conversation:
    """LLaVA's ``Conversation``: the fields ``get_prompt()`` reads."""

    system: str
    roles: tuple[str, str]
    sep_style: str  # "TWO" | "LLAMA_2" | "PLAIN"
    sep: str
    sep2: str | None

    def get_prompt(self, messages: list[tuple[str, str | None]]) -> str:
        if self.sep_style == "TWO":
            seps = [self.sep, self.sep2]
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
            return ret
        if self.sep_style == "LLAMA_2":

            def wrap_sys(msg: str) -> str:
                return f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg

            ret = ""
            for i, (role, message) in enumerate(messages):
                if i == 0:
                    assert message and role == self.roles[0]
                if message:
                    if i == 0:
                        message = wrap_sys(self.system) + message
                    if i % 2 == 0:
                        ret += self.sep + f"[INST] {message} [/INST]"
                    else:
                        ret += " " + message + " " + self.sep2
            return ret.lstrip(self.sep)
        if self.sep_style == "PLAIN":
            seps = [self.sep, self.sep2]
            ret = self.system
            for i, (_role, message) in enumerate(messages):
                if message:
                    ret += message + seps[i % 2]  # sep2 is None: an answer raises TypeError, as in LLaVA
            return ret
        raise ValueError(self.sep_style)


REFERENCE = {
    "vicuna_v1": Conversation(CURIOUS_USER, ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "llava_v1": Conversation(CURIOUS_HUMAN, ("USER", "ASSISTANT"), "TWO", " ", "</s>"),
    "llava_llama_2": Conversation(
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.",
        ("USER", "ASSISTANT"),
        "LLAMA_2",
        "<s>",
        "</s>",
    ),
    "mistral_instruct": Conversation("", ("USER", "ASSISTANT"), "LLAMA_2", "", "</s>"),
    "plain": Conversation("", ("", ""), "PLAIN", "\n", None),
    "phi": Conversation(CURIOUS_USER, ("USER", "ASSISTANT"), "TWO", " ", "<|endoftext|>"),
    "stablelm": Conversation(CURIOUS_USER, ("USER", "ASSISTANT"), "TWO", " ", "<|endoftext|>"),
}
# what the reference's training code puts after each answer in the labels
ANSWER_END = {
    "vicuna_v1": "</s>",
    "llava_v1": "</s>",
    "phi": "<|endoftext|>",
    "stablelm": "<|endoftext|>",
    "llava_llama_2": " </s>",
    "mistral_instruct": " </s>",
    "plain": "\n",
}
CHAT_PRESETS = [p for p in CONVERSATION_PRESETS if p != "plain"]


def preprocess_plain(user: str, answer: str) -> str:
    """LLaVA ``preprocess_plain``: the user message becomes ``<image>`` alone, then the answer and sep."""
    assert "<image>" in user
    return "<image>" + answer + "\n"


SYSTEM = "You are a careful radiology assistant."
Q1, A1 = "<image>\nWhich organ is shown?", "The left lung."
Q2, A2 = "Is it abnormal?", "No."
TURNS = [("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)]


def messages(system: str | None = SYSTEM, turns=TURNS) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": role, "content": content} for role, content in turns]


def reference_prompt(name: str, system: str | None, turns, *, generation: bool = False) -> str:
    conv = REFERENCE[name] if system is None else replace(REFERENCE[name], system=system)
    user, assistant = conv.roles
    pairs = [(user if role == "user" else assistant, content) for role, content in turns]
    if generation:
        pairs.append((assistant, None))
    return conv.get_prompt(pairs)


# -- a tiny tokenizer ----------------------------------------------------------------------------------------

WORDS = "which organ is shown the left lung no it abnormal ? . a chat between".split()


def word_tokenizer(*, bos: bool):
    """A whitespace word-level tokenizer that adds ``<s>`` (Llama-like) or nothing (Phi-2-like)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


def render(tok, name: str, msgs, *, add_bos: bool, generation: bool = False) -> str:
    tok.chat_template = conversation_template(name, add_bos=add_bos)
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(bos=True)


# -- rendering -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHAT_PRESETS)
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_two_turns_render_the_reference_prompt(tok, name: str, system: str | None) -> None:
    expected = reference_prompt(name, system, TURNS)
    assert render(tok, name, messages(system), add_bos=False) == expected
    assert render(tok, name, messages(system), add_bos=True) == "<s>" + expected


def test_reference_strings_spelled_out(tok) -> None:
    """The reference itself, for one conversation: what LLaVA v1.5 and LLaVA-Med v1.5 train and prompt with."""
    assert render(tok, "vicuna_v1", messages(), add_bos=True) == (
        f"<s>{SYSTEM} USER: <image>\nWhich organ is shown? ASSISTANT: The left lung.</s>"
        "USER: Is it abnormal? ASSISTANT: No.</s>"
    )
    assert render(tok, "mistral_instruct", messages(None), add_bos=True) == (
        "<s>[INST] <image>\nWhich organ is shown? [/INST] The left lung. </s>[INST] Is it abnormal? [/INST] No. </s>"
    )
    assert render(tok, "llava_llama_2", messages(), add_bos=True) == (
        f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n<image>\nWhich organ is shown? [/INST] The left lung. </s>"
        "<s>[INST] Is it abnormal? [/INST] No. </s>"
    )
    assert render(tok, "phi", messages(None), add_bos=False) == (
        f"{CURIOUS_USER} USER: <image>\nWhich organ is shown? ASSISTANT: The left lung.<|endoftext|>"
        "USER: Is it abnormal? ASSISTANT: No.<|endoftext|>"
    )


@pytest.mark.parametrize("name", CHAT_PRESETS)
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_generation_prompt_is_get_prompt_with_no_answer(tok, name: str, system: str | None) -> None:
    for k in (1, 3):  # before the first and before the second answer
        expected = reference_prompt(name, system, TURNS[:k], generation=True)
        assert render(tok, name, messages(system, TURNS[:k]), add_bos=False, generation=True) == expected
    tail = {"TWO": "ASSISTANT:", "LLAMA_2": "[/INST]"}[REFERENCE[name].sep_style]
    assert render(tok, name, messages(system, TURNS[:1]), add_bos=True, generation=True).endswith(tail)


@pytest.mark.parametrize("name", CONVERSATION_PRESETS)
@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("add_bos", [True, False])
def test_renders_prefix_by_prefix(tok, name: str, system: str | None, add_bos: bool) -> None:
    msgs = messages(system, TURNS[:2] if name == "plain" else TURNS)
    previous = ""
    for k in range(1, len(msgs) + 1):
        text = render(tok, name, msgs[:k], add_bos=add_bos, generation=msgs[k - 1]["role"] == "user")
        assert text.startswith(previous), (k, previous, text)
        previous = text
    assert previous == render(tok, name, msgs, add_bos=add_bos)


def test_system_message_alone_leaves_the_separator_to_the_first_turn(tok) -> None:
    """The one render that differs from get_prompt(): TWO's sep after a lone system text comes with the user
    turn, so no encoder piece ends in a lone space."""
    assert render(tok, "vicuna_v1", messages(SYSTEM, []), add_bos=False) == SYSTEM
    assert render(tok, "vicuna_v1", messages(SYSTEM, []), add_bos=False, generation=True) == SYSTEM + " ASSISTANT:"


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_plain_is_llava_pretraining_format(tok, system: str | None) -> None:
    one = TURNS[:2]
    assert render(tok, "plain", messages(system, one), add_bos=False) == preprocess_plain(Q1, A1)
    assert render(tok, "plain", messages(system, one), add_bos=True) == "<s>" + preprocess_plain(Q1, A1)
    assert render(tok, "plain", messages(system, one[:1]), add_bos=True, generation=True) == "<s><image>"
    # get_prompt() itself cannot write an answer for PLAIN (sep2 is None), which is why preprocess_plain is the
    # reference
    with pytest.raises(TypeError):
        reference_prompt("plain", None, one)


@pytest.mark.parametrize(
    "name, msgs",
    [
        ("plain", messages(None)),  # two exchanges: preprocess_plain asserts one
        ("plain", messages(None, [("user", "Which organ is shown?"), ("assistant", A1)])),  # no image
        ("vicuna_v1", messages(None, [("assistant", A1)])),  # must start with the user
        ("llava_llama_2", messages(None, [("user", Q1), ("user", Q2)])),  # must alternate
        ("mistral_instruct", messages(None, [("user", "")])),  # first message empty: LLaVA asserts
        ("phi", [{"role": "user", "content": Q1}, {"role": "system", "content": SYSTEM}]),  # system not first
    ],
)
def test_what_the_reference_asserts_is_refused(tok, name: str, msgs) -> None:
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError):
        render(tok, name, msgs, add_bos=False)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="vicuna_v1"):
        conversation_template("vicuna_v2", add_bos=True)  # type: ignore[arg-type]


# -- BOS -----------------------------------------------------------------------------------------------------


def test_bos_follows_the_tokenizer(tmp_path: Path) -> None:
    from pipeline.model_factory import adds_bos

    llama_like, phi_like = word_tokenizer(bos=True), word_tokenizer(bos=False)
    assert adds_bos(llama_like) and not adds_bos(phi_like)
    for template_tok, add in ((llama_like, True), (phi_like, False)):
        text = render(template_tok, "vicuna_v1", messages(), add_bos=add)
        ids = template_tok(text, add_special_tokens=False)["input_ids"]
        # the template's ids without special tokens equal the tokenizer's own ids of the reference prompt
        assert ids == template_tok(reference_prompt("vicuna_v1", SYSTEM, TURNS))["input_ids"]


def test_builder_sets_the_preset(cache_dir: Path, tiny_llama: Path, tiny_clip: Path) -> None:
    from pipeline.config import load_config
    from pipeline.model_factory import adds_bos, build_model

    demo = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"
    cfg = load_config(demo, ["model.llm.conversation=vicuna_v1"], check_paths=False)
    tokenizer = build_model(cfg.model, cache_dir=cache_dir, weights="none").tokenizer
    add = adds_bos(tokenizer)
    assert tokenizer.chat_template == conversation_template("vicuna_v1", add_bos=add)
    text = tokenizer.apply_chat_template(messages(None, TURNS[:1]), tokenize=False, add_generation_prompt=True)
    assert text == ("<s>" if add else "") + reference_prompt("vicuna_v1", None, TURNS[:1], generation=True)


# -- the encoder ---------------------------------------------------------------------------------------------

N_IMG = 3


def record() -> Record:
    turns = [Turn("Which organ is shown?", A1), Turn(Q2, A2)]
    return Record(
        id="rec-1", dataset="toy", split="train", question=turns[0].question, answer=A1, answer_type="open",
        image_path="img.png", turns=turns,
    )  # fmt: skip


def label_spans(sample) -> list[list[int]]:
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in sample.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(label)
        previous = label
    return spans


@pytest.mark.parametrize("name", CONVERSATION_PRESETS)
def test_encoder_trains_on_the_answers_and_their_separator(tiny_llama: Path, name: str) -> None:
    """Labels = each answer + what the reference trains after it (preprocess_v1 / _phi / _llama_2: the
    answer's tokens through sep2; preprocess_plain: answer + "\\n"); the prompt is the reference prompt."""
    from lightningmodules.models.language import load_tokenizer

    tok = load_tokenizer(tiny_llama, extra_special_tokens=["<image>"])
    from pipeline.model_factory import adds_bos

    add = adds_bos(tok)
    tok.chat_template = conversation_template(name, add_bos=add)
    rec = record()
    if name == "plain":
        rec.turns = rec.turns[:1]
    encoder = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt=SYSTEM)
    sample = encoder.encode(rec, with_answers=True)
    answers = [t.answer for t in rec.turns]
    # the space before an answer is part of its first token in the reference too (SentencePiece "▁The",
    # GPT-2 "ĠThe"); plain writes the answer right after <image>
    lead = "" if name == "plain" else " "
    assert [tok.decode(span) for span in label_spans(sample)] == [lead + a + ANSWER_END[name] for a in answers]
    # every id, prompt included, is the reference prompt's (with the image placeholder expanded)
    turns = [("user", Q1), ("assistant", A1)] + ([] if name == "plain" else [("user", Q2), ("assistant", A2)])
    expected = ("<s>" if add else "") + (
        preprocess_plain(Q1, A1) if name == "plain" else reference_prompt(name, SYSTEM, turns)
    )
    assert tok.decode(sample.input_ids) == expected.replace("<image>", "<image>" * N_IMG)
    prompt = encoder.encode(rec, with_answers=False)
    expected_prompt = "<image>" if name == "plain" else reference_prompt(name, SYSTEM, turns[:1], generation=True)
    assert tok.decode(prompt.input_ids) == ("<s>" if add else "") + expected_prompt.replace(
        "<image>", "<image>" * N_IMG
    )
    assert sample.input_ids[: len(prompt.input_ids)] == prompt.input_ids


# -- tokenisation against the whole prompt, SentencePiece style ----------------------------------------------


def sentencepiece_llama(corpus: list[str], *, legacy: bool):
    """A Llama tokenizer as transformers builds it from a download: BPE with byte fallback and a Metaspace
    pre-tokenizer (``legacy`` true: "▁" before every text between special tokens; false: only at the start)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    trainer = Tokenizer(models.BPE())
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<unk>", "<s>", "</s>"]
    trainer.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    )
    model = json.loads(trainer.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def tokenizer_image_token(prompt: str, tok, image_id: int) -> list[int]:
    """LLaVA ``mm_utils.tokenizer_image_token``: each text between ``<image>``s tokenised on its own (one BOS)."""
    chunks = [tok(chunk).input_ids for chunk in prompt.split("<image>")]
    out: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        out.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            out.append(image_id)
        out.extend(chunk[offset:])
    return out


def preprocess_v1_labels(prompt: str, tok, image_id: int) -> tuple[list[int], list[int]]:
    """LLaVA ``preprocess_v1``'s targets (``cur_len`` starts after BOS, instruction_len - 2)."""
    ids = tokenizer_image_token(prompt, tok, image_id)
    target = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for rou in prompt.split("</s>"):
        if rou == "":
            break
        instruction = rou.split(sep)[0] + sep
        round_len = len(tokenizer_image_token(rou, tok, image_id))
        instruction_len = len(tokenizer_image_token(instruction, tok, image_id)) - 2
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * (len(target) - cur)
    assert cur == len(ids), "tokenization mismatch (LLaVA would drop the sample)"
    return ids, target


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_vicuna_v1_ids_equal_llava_tokenisation_with_a_legacy_llama_tokenizer(system: str | None) -> None:
    """Our piece-by-piece ids of a vicuna_v1 conversation equal LLaVA's ids of the whole prompt
    (tokenizer_image_token) and its preprocess_v1 labels, for a Llama tokenizer with legacy=True (transformers'
    Metaspace with a "▁" before each text between special tokens, as SentencePiece's legacy mode)."""
    corpus = [CURIOUS_USER, SYSTEM, reference_prompt("vicuna_v1", None, TURNS)] * 20
    tok = sentencepiece_llama(corpus, legacy=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    from pipeline.model_factory import adds_bos

    assert adds_bos(tok)
    tok.chat_template = conversation_template("vicuna_v1", add_bos=True)
    rec = record()
    rec.turns[0] = Turn("Which organ is shown?", A1)
    sample = ConversationEncoder(tok, num_image_tokens=1, system_prompt=system).encode(rec, with_answers=True)
    prompt = reference_prompt("vicuna_v1", system, TURNS)
    ids, labels = preprocess_v1_labels(prompt, tok, image_id)
    assert sample.input_ids == ids == tok(prompt).input_ids
    assert sample.labels == labels


# -- config --------------------------------------------------------------------------------------------------

DEMO = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"


def test_config_takes_a_preset_and_refuses_others(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    assert load_config(DEMO, ["model.llm.conversation=vicuna_v1"]).model.llm.conversation == "vicuna_v1"
    assert load_config(DEMO).model.llm.conversation is None
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["model.llm.conversation=vicuna_v2"])
    assert str(info.value).startswith("command line: key 'model.llm.conversation': ")
    assert "'vicuna_v2'" in str(info.value)
    path = tmp_path / "exp.yaml"
    path.write_text(f"defaults: [{DEMO}]\nmodel:\n  llm: {{conversation: plain, chat_template: '{{{{ x }}}}'}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "key 'model.llm.conversation'" in message and "model.llm.chat_template" in message
