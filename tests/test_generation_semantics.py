"""Greedy generation means greedy, and stops where the checkpoint stops.

Checkpoints are saved the way a download looks: a tiny random LLM with a ``generation_config.json``
that asks for sampling and a repetition penalty and lists two eos ids, and a tokenizer whose chat
template ends each turn with ``<end_of_turn>``. Our evaluation must ignore the sampling settings,
stop at the tokenizer's eos, every id of the eos list and the end-of-turn token, and answer the same
whether prompts come batched (left-padded) or one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lightningmodules.models.language import (
    decode_answers,
    end_of_turn_token_id,
    load_causal_lm,
    load_tokenizer,
    stop_token_ids,
)
from lightningmodules.models.multimodal import MultimodalLM

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<end_of_turn>", "<|endoftext|>", "<start_of_turn>", "<image>"]
PAD, BOS, EOS, UNK, END_OF_TURN, ENDOFTEXT, START_OF_TURN, IMAGE = range(len(SPECIALS))
WORDS = [f"w{i}" for i in range(40)]
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHECKPOINT_GENERATION = {
    "bos_token_id": BOS,
    "eos_token_id": [EOS, ENDOFTEXT],  # a list, as Gemma-2-it / Llama-3-Instruct ship
    "pad_token_id": PAD,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.3,
}
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def save_tokenizer(out: Path, chat_template: str = GEMMA_STYLE_TEMPLATE) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)


def family_config(family: str):
    import transformers

    common = {"vocab_size": len(SPECIALS) + len(WORDS), "max_position_embeddings": 128, **SIZES}
    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, **ids, **common)
    if family == "phi":  # its LM head has a bias: the forced-stop tests steer it
        return transformers.PhiConfig(partial_rotary_factor=0.5, **ids, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **ids, **common)
    if family == "gemma2":
        return transformers.Gemma2Config(
            num_key_value_heads=2,
            head_dim=8,
            attn_implementation="eager",
            tie_word_embeddings=False,  # the test scales the LM head only
            **ids,
            **common,
        )
    raise ValueError(family)


def save_checkpoint(out: Path, family: str) -> Path:
    """Tokenizer + random LLM + a ``generation_config.json`` asking for sampling and a penalty."""
    from transformers import AutoModelForCausalLM

    save_tokenizer(out)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(family_config(family))
    with torch.no_grad():  # logits of a few units, so greedy picks are well separated
        llm.get_output_embeddings().weight.mul_(20.0)
    llm.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps(CHECKPOINT_GENERATION))
    return out


def load(path: Path) -> tuple[MultimodalLM, object]:
    tokenizer = load_tokenizer(path, extra_special_tokens=["<image>"])
    llm = load_causal_lm(path, vocab_size=len(tokenizer)).eval()
    model = MultimodalLM(
        vision=nn.Identity(),
        connector=nn.Identity(),
        llm=llm,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_image_tokens=1,
    )
    return model.eval(), tokenizer


def prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as a one-turn chat prompt ending in the generation prompt."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, padded on the left as the evaluation collator pads."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


QUESTIONS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12", "w20 w21"]


@pytest.fixture(params=["llama", "phi", "qwen2", "gemma2"])
def checkpoint(request, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / request.param, request.param)


def test_stop_tokens_are_eos_the_eos_list_and_the_end_of_turn_token(checkpoint: Path) -> None:
    model, tokenizer = load(checkpoint)
    assert end_of_turn_token_id(tokenizer) == END_OF_TURN
    assert stop_token_ids(tokenizer) == [EOS, END_OF_TURN]
    assert model.stop_token_ids(stop_token_ids(tokenizer)) == [EOS, END_OF_TURN, ENDOFTEXT]


def test_greedy_equals_hf_greedy_and_ignores_the_checkpoint_sampling_settings(checkpoint: Path) -> None:
    model, tokenizer = load(checkpoint)
    stops = model.stop_token_ids(stop_token_ids(tokenizer))
    for row in prompts(tokenizer, QUESTIONS):
        ids = torch.tensor([row])  # (1, T)
        mask = torch.ones_like(ids)
        ours = model.generate(ids, mask, max_new_tokens=12, eos_token_id=stops, pad_token_id=PAD)[0]
        reference = model.llm.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            repetition_penalty=1.0,
            max_new_tokens=12,
            eos_token_id=stops,
            pad_token_id=PAD,
        )[0, ids.shape[1] :]
        assert ours.tolist() == reference.tolist()
    # the checkpoint's settings are live: taken as they are, HF's penalised answers differ
    rows = prompts(tokenizer, QUESTIONS)
    penalised = [
        model.llm.generate(input_ids=torch.tensor([r]), do_sample=False, max_new_tokens=12)[0, len(r) :].tolist()
        for r in rows
    ]
    greedy = [
        model.generate(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), max_new_tokens=12)[0] for r in rows
    ]
    assert penalised != [g.tolist() for g in greedy]


def test_lora_wrapped_llm_generates_greedy_and_keeps_its_generation_config(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load(save_checkpoint(tmp_path, "llama"))
    stops = model.stop_token_ids(stop_token_ids(tokenizer))
    ids, mask = left_padded(prompts(tokenizer, QUESTIONS))
    settings = {"max_new_tokens": 10, "eos_token_id": stops, "pad_token_id": PAD}
    plain = model.generate(ids, mask, **settings)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert model.generate(ids, mask, **settings).tolist() == plain.tolist()  # LoRA B starts at zero
    assert model.llm.get_base_model().generation_config.repetition_penalty == 1.3  # the checkpoint's, restored
    assert model.stop_token_ids() == [EOS, ENDOFTEXT]


def test_batched_answers_equal_one_at_a_time(checkpoint: Path) -> None:
    model, tokenizer = load(checkpoint)
    stops = model.stop_token_ids(stop_token_ids(tokenizer))
    rows = prompts(tokenizer, QUESTIONS)
    settings = {"max_new_tokens": 10, "eos_token_id": stops, "pad_token_id": PAD}
    batched = model.generate(*left_padded(rows), **settings)  # (B, K)
    singles = [model.generate(*left_padded([r]), **settings)[0] for r in rows]
    for row, single in zip(batched, singles, strict=True):
        assert row.tolist()[: len(single)] == single.tolist()
    assert decode_answers(tokenizer, batched, stops) == [decode_answers(tokenizer, s[None], stops)[0] for s in singles]


@pytest.mark.parametrize("stop", [ENDOFTEXT, END_OF_TURN])
def test_generation_stops_at_every_stop_token(tmp_path: Path, stop: int) -> None:
    """The model is steered to say ``w3`` (id 11) until it may stop, then the stop token (the eos list's
    second id / the template's end-of-turn): decoding ends there and the answer holds no template token."""
    from lightningmodules.vlm_module import VLMModule

    model, tokenizer = load(save_checkpoint(tmp_path, "phi"))
    word = tokenizer.convert_tokens_to_ids("w3")
    with torch.no_grad():
        head = model.lm_head()
        head.weight.zero_()
        head.bias.zero_()
        head.bias[word] = 5.0
        head.bias[stop] = 10.0  # the stop token wins as soon as min_new_tokens lets it
    module = VLMModule(model=model, tokenizer=tokenizer, max_new_tokens=12)
    settings = module.generation_settings()
    ids, mask = left_padded(prompts(tokenizer, QUESTIONS[:2]))
    generated = model.generate(ids, mask, min_new_tokens=3, **{**settings, "max_new_tokens": 12})
    assert generated.shape[1] == 4  # w3 w3 w3 <stop>, not 12 tokens
    assert generated[:, :3].eq(word).all() and generated[:, 3].eq(stop).all()
    assert decode_answers(tokenizer, generated, settings["eos_token_id"]) == ["w3 w3 w3", "w3 w3 w3"]
    # the evaluation path (module.generate_texts) gives the same clean answers
    batch = {"input_ids": ids, "attention_mask": mask}
    assert module.generate_texts(batch) == ["", ""]  # no min_new_tokens: the stop token comes first


def test_end_of_turn_token_of_other_templates(tmp_path: Path) -> None:
    chatml = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    save_tokenizer(tmp_path / "chatml", chat_template=chatml)
    tokenizer = load_tokenizer(tmp_path / "chatml", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    assert end_of_turn_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"  # no end-of-turn token
    save_tokenizer(tmp_path / "plain", chat_template=plain)
    tokenizer = load_tokenizer(tmp_path / "plain", extra_special_tokens=[])
    assert end_of_turn_token_id(tokenizer) is None
    assert stop_token_ids(tokenizer) == [EOS]
