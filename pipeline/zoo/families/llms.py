"""Real-architecture language models at tiny sizes: ``tiny:<family>`` for Llama-2-chat, Vicuna, Mistral-Instruct,
Phi-2, StableLM-2, Qwen2-Instruct, Qwen3, Gemma-2-it and Llama-3-Instruct.

Each folder looks like the family's download: the family's transformers model class and config quirks (GQA,
partial rotary, QKV bias, q/k norms, soft-capping, tied embeddings), its tokenizer class and special tokens,
its chat template (the released jinja, in ``templates/``, or none where the release has none) and its
``generation_config.json`` (eos lists, sampling settings, repetition penalty) with ids mapped onto the tiny
vocabulary. The vocabulary is a BPE trained on the synthetic corpus in the family's own style (SentencePiece
``▁`` pieces with byte fallback, or GPT-2 byte level). The weights are briefly pretrained on the corpus in the
family's own chat format, so answers end with the family's end-of-turn token as a real instruct model's do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

TEMPLATES = Path(__file__).resolve().parent / "templates"
TokenizerStyle = Literal["sentencepiece", "byte_level"]

# the released checkpoints' sizes are scaled down to these; each family keeps its own head/rotary quirks
TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
VOCAB_SIZE = 900  # BPE vocabulary trained on the corpus, before the family's special tokens
PRETRAIN_STEPS = 160


@dataclass(frozen=True)
class LLMFamily:
    """What makes a download of this family what it is. Token fields name tokens; ids are resolved at build."""

    model_type: str  # transformers config class key, e.g. "llama"
    config: dict[str, Any]  # the family's config fields besides TINY_SIZES and the token ids
    tokenizer_class: str  # the class tokenizer_config.json names
    style: TokenizerStyle
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None
    specials: tuple[str, ...]  # the family's special tokens, in id order after its bos/eos/unk/pad
    template: str | None  # templates/<name>.jinja, or None: the release has no chat template
    generation: dict[str, Any]  # generation_config.json; token fields hold token names
    add_bos: bool  # whether the tokenizer prepends bos (Llama, Gemma) or not (Qwen, Phi-2, StableLM-2)
    extra_files: dict[str, Any] = field(default_factory=dict)


_LLAMA_SPECIALS = dict(bos="<s>", eos="</s>", unk="<unk>", pad=None, specials=())
# GPT-2's byte-level BPE with one special token for everything, no template (Phi-2, StableLM-2 base)
_GPT2_STYLE = dict(
    style="byte_level",
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    unk="<|endoftext|>",
    pad=None,
    specials=(),
    template=None,
    generation={"bos_token_id": "<|endoftext|>", "eos_token_id": "<|endoftext|>"},
    add_bos=False,
)
# Qwen's byte-level BPE with ChatML: eos <|im_end|>, pad <|endoftext|>, no bos
_QWEN_TOKENS = dict(
    tokenizer_class="Qwen2Tokenizer",
    style="byte_level",
    bos=None,
    eos="<|im_end|>",
    unk=None,
    pad="<|endoftext|>",
    add_bos=False,
)
_LLAMA_CONFIG = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0}

LLM_FAMILIES: dict[str, LLMFamily] = {
    "llama2-chat": LLMFamily(
        model_type="llama",
        config=_LLAMA_CONFIG,
        tokenizer_class="LlamaTokenizer",
        style="sentencepiece",
        template="llama-2-chat",
        generation={
            "bos_token_id": "<s>",
            "eos_token_id": "</s>",
            "pad_token_id": "<unk>",
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
            "max_length": 4096,
        },
        add_bos=True,
        **_LLAMA_SPECIALS,
    ),
    "vicuna": LLMFamily(  # vicuna-7b-v1.5: Llama-2 weights, no chat template in the release
        model_type="llama",
        config=_LLAMA_CONFIG,
        tokenizer_class="LlamaTokenizer",
        style="sentencepiece",
        template=None,
        generation={
            "bos_token_id": "<s>",
            "eos_token_id": "</s>",
            "pad_token_id": "<unk>",
            "do_sample": True,
            "temperature": 0.9,
            "top_p": 0.6,
            "max_length": 4096,
        },
        add_bos=True,
        **_LLAMA_SPECIALS,
    ),
    "mistral-instruct": LLMFamily(  # Mistral-7B-Instruct-v0.2 (LLaVA-Med v1.5's LLM)
        model_type="mistral",
        config={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 1e6, "sliding_window": None},
        tokenizer_class="LlamaTokenizer",
        style="sentencepiece",
        template="mistral-instruct",
        generation={"bos_token_id": "<s>", "eos_token_id": "</s>"},
        add_bos=True,
        **_LLAMA_SPECIALS,
    ),
    "phi2": LLMFamily(  # microsoft/phi-2: CodeGen tokenizer, no template, LM head with bias, partial rotary
        model_type="phi",
        config={
            "partial_rotary_factor": 0.4,
            "resid_pdrop": 0.1,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "num_key_value_heads": 4,
        },
        tokenizer_class="CodeGenTokenizer",
        **_GPT2_STYLE,
    ),
    "stablelm2": LLMFamily(  # stabilityai/stablelm-2-1_6b: GPT-2 style tokenizer, QKV bias, 25% rotary
        model_type="stablelm",
        config={
            "partial_rotary_factor": 0.25,
            "use_qkv_bias": True,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "num_key_value_heads": 4,
        },
        tokenizer_class="GPT2Tokenizer",
        **_GPT2_STYLE,
    ),
    "qwen2-instruct": LLMFamily(  # Qwen2-0.5B-Instruct: ChatML, tied embeddings, an eos list and a penalty
        model_type="qwen2",
        config={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 1e6},
        **_QWEN_TOKENS,
        specials=("<|im_start|>",),
        template="qwen2-instruct",
        generation={
            "bos_token_id": "<|endoftext|>",
            "pad_token_id": "<|endoftext|>",
            "do_sample": True,
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
            "repetition_penalty": 1.1,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
        },
    ),
    "qwen3": LLMFamily(  # Qwen3-0.6B: q/k norms, explicit head_dim, a thinking switch in its template
        model_type="qwen3",
        config={"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 1e6, "head_dim": 32},
        **_QWEN_TOKENS,
        specials=("<|im_start|>", "<think>", "</think>"),
        template="qwen3",
        generation={
            "bos_token_id": "<|endoftext|>",
            "pad_token_id": "<|endoftext|>",
            "do_sample": True,
            "eos_token_id": ["<|im_end|>", "<|endoftext|>"],
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": 20,
        },
    ),
    "gemma2-it": LLMFamily(  # gemma-2-2b-it: logit soft-capping, tied embeddings, <end_of_turn> in the eos list
        model_type="gemma2",
        config={
            "head_dim": 16,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "query_pre_attn_scalar": 16,
            "sliding_window": 64,
            "tie_word_embeddings": True,
            "hidden_activation": "gelu_pytorch_tanh",
            "attn_implementation": "eager",
        },
        tokenizer_class="GemmaTokenizer",
        style="sentencepiece",
        bos="<bos>",
        eos="<eos>",
        unk="<unk>",
        pad="<pad>",
        specials=("<mask>", "<start_of_turn>", "<end_of_turn>"),
        template="gemma-2-it",
        generation={
            "bos_token_id": "<bos>",
            "eos_token_id": ["<eos>", "<end_of_turn>"],
            "pad_token_id": "<pad>",
            "cache_implementation": "hybrid",
        },
        add_bos=True,
    ),
    "llama3-instruct": LLMFamily(  # Meta-Llama-3-8B-Instruct: tiktoken-style byte level, header tokens
        model_type="llama",
        config={"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 500000.0},
        tokenizer_class="PreTrainedTokenizerFast",
        style="byte_level",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        unk=None,
        pad=None,
        specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
        template="llama-3-instruct",
        generation={
            "bos_token_id": "<|begin_of_text|>",
            "eos_token_id": ["<|end_of_text|>", "<|eot_id|>"],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        },
        add_bos=True,
    ),
}


def chat_template(family: LLMFamily) -> str | None:
    return None if family.template is None else (TEMPLATES / f"{family.template}.jinja").read_text()


def family_special_tokens(family: LLMFamily) -> list[str]:
    """The family's special tokens in id order, each once."""
    named = [family.unk, family.bos, family.eos, family.pad, *family.specials]
    return list(dict.fromkeys(t for t in named if t is not None))


def train_vocabulary(family: LLMFamily, texts: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary and merges in the family's style; special tokens take the first ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = family_special_tokens(family)
    backend = Tokenizer(models.BPE())
    if family.style == "sentencepiece":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet: list[str] = []
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    if family.style == "sentencepiece":  # SentencePiece byte fallback pieces, as Llama and Gemma ship them
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def make_tokenizer(family: LLMFamily, texts: list[str]):
    """The family's tokenizer class over a vocabulary trained on ``texts``, with its template and specials."""
    import transformers

    vocab, merges = train_vocabulary(family, texts)
    tokens = {"bos_token": family.bos, "eos_token": family.eos, "unk_token": family.unk, "pad_token": family.pad}
    if family.tokenizer_class == "PreTrainedTokenizerFast":
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_backend(vocab, merges, bos=family.bos if family.add_bos else None),
            **tokens,
        )
    else:
        cls = getattr(transformers, family.tokenizer_class)
        extra = {"add_bos_token": True} if family.add_bos else {}
        tokenizer = cls(vocab=vocab, merges=merges, **tokens, **extra)
    specials = [t for t in family.specials if t not in (family.bos, family.eos, family.unk, family.pad)]
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    template = chat_template(family)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]], *, bos: str | None):
    """tiktoken-converted byte-level BPE as Llama-3 ships it (tokenizer.json only, bos by a template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return backend


def llm_config(family: LLMFamily, tokenizer) -> Any:
    from transformers import AutoConfig

    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(family.bos) if family.bos else None,
        "eos_token_id": tokenizer.convert_tokens_to_ids(family.eos),
        "pad_token_id": tokenizer.convert_tokens_to_ids(family.pad) if family.pad else None,
    }
    fields = {**TINY_SIZES, **family.config, **ids, "vocab_size": len(tokenizer)}
    return AutoConfig.for_model(family.model_type, **fields)


def generation_config(family: LLMFamily, tokenizer) -> dict[str, Any]:
    """generation_config.json with the family's token names mapped to the tiny vocabulary's ids."""

    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [tokenizer.convert_tokens_to_ids(v) for v in value]
        return tokenizer.convert_tokens_to_ids(value)

    return {k: resolve(v) if k.endswith("token_id") else v for k, v in family.generation.items()}


def llm_builder(name: str) -> Callable[[Path, Path], None]:
    family = LLM_FAMILIES[name]

    def build(out: Path, _cache: Path) -> None:
        from transformers import AutoModelForCausalLM

        from lightningmodules.models.language import DEFAULT_CHAT_TEMPLATE
        from pipeline.zoo.corpus import synthetic_corpus
        from pipeline.zoo.language import pretrain_lm

        tokenizer = make_tokenizer(family, [f"{q}\n{a}" for q, a in synthetic_corpus(300)])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(llm_config(family, tokenizer))
        # pretrain in the chat format the pipeline will use: the family's template, else the default
        released_template, released_pad = tokenizer.chat_template, tokenizer.pad_token
        # thinking off, as the pipeline renders by default (model.llm.enable_thinking: false)
        tokenizer.chat_template = "{%- set enable_thinking = false %}" + (released_template or DEFAULT_CHAT_TEMPLATE)
        tokenizer.pad_token = released_pad or tokenizer.unk_token or tokenizer.eos_token  # as load_tokenizer
        pretrain_lm(model, tokenizer, steps=PRETRAIN_STEPS)
        tokenizer.chat_template, tokenizer.pad_token = released_template, released_pad
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        # exactly as the family ships it (save_pretrained writes one derived from the model config)
        (out / "generation_config.json").write_text(json.dumps(generation_config(family, tokenizer), indent=2))
        if family.tokenizer_class == "PreTrainedTokenizerFast":  # transformers 5 writes its new base name
            config_file = out / "tokenizer_config.json"
            config = json.loads(config_file.read_text())
            config_file.write_text(json.dumps({**config, "tokenizer_class": family.tokenizer_class}, indent=2))

    return build
