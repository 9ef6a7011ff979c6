"""``tiny:tokenizer``: a byte-level BPE trained on the synthetic corpus, shared by every tiny LM."""

from __future__ import annotations

from pathlib import Path

from pipeline.zoo.cache import ensure_tiny
from pipeline.zoo.corpus import synthetic_corpus

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<image>"]


def build_tokenizer(out: Path, _cache: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightningmodules.models.language import DEFAULT_CHAT_TEMPLATE

    texts = [f"USER: {q}\nASSISTANT: {a}" for q, a in synthetic_corpus(600)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.save_pretrained(out)


def load_tiny_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_tiny("tokenizer", cache))
