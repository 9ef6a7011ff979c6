"""ConversationEncoder (chat template, image placeholders, prompt masking) and the Collator."""

from __future__ import annotations

import pytest
import torch

from datamodules.dataset import Collator
from datamodules.encoding import IGNORE_INDEX, ConversationEncoder
from datamodules.records import Record, Turn

N_IMG = 5


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from lightningmodules.models.language import load_tokenizer

    return load_tokenizer(tiny_llama, extra_special_tokens=["<image>"])


@pytest.fixture(scope="module")
def enc(tok) -> ConversationEncoder:
    return ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=256)


def record(question="Is there a lesion?", answer="Yes", *, image=True, turns=None, rid="rec-1", task="vqa") -> Record:
    return Record(
        id=rid,
        dataset="toy",
        split="train",
        question=question,
        answer=answer,
        answer_type="closed",
        task=task,
        image_path="img.png" if image else None,
        turns=turns or [],
    )


def supervised(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def label_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The supervised runs of a sample, decoded."""
    spans, current = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == t
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tok.decode(s) for s in spans]


def test_tokenizer_has_image_token(tok, enc) -> None:
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.image_token_id == image_id
    assert image_id != tok.unk_token_id
    assert tok.pad_token_id is not None


def test_encoder_rejects_tokenizer_without_image_token() -> None:
    class NoImageTokenizer:  # what HF tokenizers do for an unknown token: return the unk id
        unk_token_id = 0

        def convert_tokens_to_ids(self, token: str) -> int:
            return self.unk_token_id

    with pytest.raises(ValueError, match="<image>"):
        ConversationEncoder(NoImageTokenizer(), num_image_tokens=2)


def test_image_placeholder_expanded(tok, enc) -> None:
    sample = enc.encode(record(), with_answers=True)
    image_id = enc.image_token_id
    positions = [i for i, t in enumerate(sample.input_ids) if t == image_id]
    assert len(positions) == N_IMG
    assert positions == list(range(positions[0], positions[0] + N_IMG))  # one contiguous run
    assert not sample.truncated
    # a different count gives a different expansion, nothing else changes
    other = ConversationEncoder(tok, num_image_tokens=2).encode(record(), with_answers=True)
    assert other.input_ids.count(image_id) == 2
    assert len(sample.input_ids) - len(other.input_ids) == N_IMG - 2


def test_rendered_text_and_labels(tok, enc) -> None:
    sample = enc.encode(record(), with_answers=True)
    assert len(sample.input_ids) == len(sample.labels)
    text = tok.decode(sample.input_ids)
    assert text == "<s>USER: " + "<image>" * N_IMG + "\nIs there a lesion?\nASSISTANT: Yes</s>"
    assert text.count("<s>") == 1  # the template's bos only, no second one from the tokenizer
    # labels: -100 on every prompt token, equal to input_ids on the answer
    first = next(i for i, lab in enumerate(sample.labels) if lab != IGNORE_INDEX)
    assert all(lab == IGNORE_INDEX for lab in sample.labels[:first])
    assert sample.labels[first:] == sample.input_ids[first:]
    assert tok.decode(sample.labels[first:]) == " Yes</s>"
    assert tok.eos_token_id in sample.labels  # the model learns to stop
    assert tok.decode(sample.input_ids[:first]).endswith("ASSISTANT:")
    assert enc.image_token_id not in supervised(sample.input_ids, sample.labels)


def test_generation_encoding_is_prefix_of_training(tok, enc) -> None:
    rec = record("What organ is abnormal?", "left lung")
    train = enc.encode(rec, with_answers=True)
    gen = enc.encode(rec, with_answers=False)
    n = len(gen.input_ids)
    assert train.input_ids[:n] == gen.input_ids  # same prompt tokens in training and evaluation
    assert len(train.input_ids) > n
    assert all(lab == IGNORE_INDEX for lab in train.labels[:n])  # the prompt is exactly what is masked
    assert all(lab != IGNORE_INDEX for lab in train.labels[n:])
    assert all(lab == IGNORE_INDEX for lab in gen.labels)
    assert tok.decode(gen.input_ids).endswith("\nASSISTANT:")
    assert tok.decode(train.input_ids[n:]) == " left lung</s>"


def test_generation_encoding_of_multi_turn_uses_first_question(tok, enc) -> None:
    rec = record(turns=[Turn("Is there a lesion?", "Yes"), Turn("Where is it?", "liver")])
    gen = enc.encode(rec, with_answers=False)
    assert gen.input_ids == enc.encode(record(), with_answers=False).input_ids
    assert "Where" not in tok.decode(gen.input_ids)


def test_multi_turn_labels_both_answers(tok, enc) -> None:
    rec = record(turns=[Turn("Is there a lesion?", "Yes"), Turn("Which organ?", "the liver")])
    sample = enc.encode(rec, with_answers=True)
    text = tok.decode(sample.input_ids)
    assert text == (
        "<s>USER: " + "<image>" * N_IMG + "\nIs there a lesion?\nASSISTANT: Yes</s>"
        "USER: Which organ?\nASSISTANT: the liver</s>"
    )
    assert sample.input_ids.count(enc.image_token_id) == N_IMG  # one image, first turn only
    # the supervised spans, in order, are exactly the two answers
    assert label_spans(tok, sample.input_ids, sample.labels) == [" Yes</s>", " the liver</s>"]
    assert "USER" not in tok.decode(supervised(sample.input_ids, sample.labels))


def test_text_only_record_has_no_image_tokens(tok, enc) -> None:
    sample = enc.encode(record(image=False), with_answers=True)
    assert enc.image_token_id not in sample.input_ids
    assert tok.decode(sample.input_ids) == "<s>USER: Is there a lesion?\nASSISTANT: Yes</s>"


def test_placeholder_in_question_text_is_moved_to_the_front(tok, enc) -> None:
    sample = enc.encode(record("<image>\nIs there a lesion?"), with_answers=True)
    assert sample.input_ids == enc.encode(record(), with_answers=True).input_ids
    # a text-only record never gets image tokens, even if the question mentions the placeholder
    assert enc.image_token_id not in enc.encode(record("<image> Is it?", image=False), with_answers=True).input_ids


def test_system_prompt_is_masked(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, system_prompt="You are a radiologist.")
    sample = enc.encode(record(), with_answers=True)
    text = tok.decode(sample.input_ids)
    assert text.startswith("<s>You are a radiologist.\nUSER: ")
    assert tok.decode(supervised(sample.input_ids, sample.labels)) == " Yes</s>"


def test_task_prefix(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, task_prefix=True)
    text = tok.decode(enc.encode(record(), with_answers=False).input_ids)
    assert text == "<s>USER: " + "<image>" * N_IMG + "\n[vqa] Is there a lesion?\nASSISTANT:"
    text = tok.decode(enc.encode(record(task="caption", image=False), with_answers=False).input_ids)
    assert text == "<s>USER: [caption] Is there a lesion?\nASSISTANT:"
    # off by default
    plain = ConversationEncoder(tok, num_image_tokens=N_IMG)
    assert "[vqa]" not in tok.decode(plain.encode(record(), with_answers=False).input_ids)


def test_overlong_prompt_raises_naming_record(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=N_IMG + 2)
    rec = record("Is there a lesion in the left lung of this patient?", rid="slake-4711")
    for with_answers in (True, False):  # the image tokens would be cut
        with pytest.raises(ValueError, match="slake-4711"):
            enc.encode(rec, with_answers=with_answers)
    text_only = record("Is there a lesion in the left lung of this patient?", image=False, rid="txt-9")
    with pytest.raises(ValueError, match="txt-9.*max_length"):
        ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=8).encode(text_only, with_answers=False)


def test_long_answer_is_truncated_in_training(tok) -> None:
    rec = record(answer="the left lung and the right lung and the liver and the spleen")
    full = ConversationEncoder(tok, num_image_tokens=N_IMG).encode(rec, with_answers=True)
    prompt_len = sum(lab == IGNORE_INDEX for lab in full.labels)
    limit = prompt_len + 3
    cut = ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=limit).encode(rec, with_answers=True)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:limit] and cut.labels == full.labels[:limit]


def test_overlong_text_prompt_raises_in_training(tok) -> None:
    enc = ConversationEncoder(tok, num_image_tokens=N_IMG, max_length=8)
    rec = record("Is there a lesion in the left lung of this patient?", image=False, rid="txt-9")
    with pytest.raises(ValueError, match="txt-9"):
        enc.encode(rec, with_answers=True)


# -- Collator --------------------------------------------------------------------------------------


def item(ids, labels, *, image=None, task_id=0, truncated=False, rid="r"):
    return {
        "record": rid,
        "input_ids": ids,
        "labels": labels,
        "truncated": truncated,
        "pixel_values": image,
        "task_id": task_id,
    }


PAD = 3


def test_collator_right_padding_for_training() -> None:
    img_a, img_c = torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 3.0)
    items = [
        item([10, 11, 12], [-100, 11, 12], image=img_a, task_id=2, rid="a"),
        item([20], [20], task_id=1, rid="b", truncated=True),
        item([30, 31], [-100, 31], image=img_c, task_id=5, rid="c"),
    ]
    batch = Collator(pad_token_id=PAD, padding_side="right")(items)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, PAD, PAD], [30, 31, PAD]]
    assert batch["labels"].tolist() == [[-100, 11, 12], [20, -100, -100], [-100, 31, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert torch.equal(batch["pixel_values"][0], img_a) and torch.equal(batch["pixel_values"][1], img_c)
    assert batch["task_ids"].tolist() == [2, 1, 5]
    assert batch["image_task_ids"].tolist() == [2, 5]  # aligned with pixel_values rows
    assert batch["truncated"] == 1
    assert batch["records"] == ["a", "b", "c"]


def test_collator_left_padding_for_generation() -> None:
    items = [item([10, 11, 12], [-100] * 3, task_id=0), item([20], [-100], image=torch.zeros(3, 2, 2), task_id=7)]
    batch = Collator(pad_token_id=PAD, padding_side="left")(items)
    assert batch["input_ids"].tolist() == [[10, 11, 12], [PAD, PAD, 20]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100] * 3] * 2
    assert batch["pixel_values"].shape == (1, 3, 2, 2)
    assert batch["image_task_ids"].tolist() == [7]


def test_collator_without_images() -> None:
    batch = Collator(pad_token_id=PAD, padding_side="right")([item([1, 2], [1, 2]), item([3], [3])])
    assert batch["pixel_values"] is None
    assert batch["image_task_ids"].tolist() == []


def test_collator_rejects_bad_side() -> None:
    with pytest.raises(ValueError, match="middle"):
        Collator(pad_token_id=PAD, padding_side="middle")


def test_collator_on_encoded_records(tok, enc) -> None:
    """Real encodings: padded rows keep their tokens, and labels survive padding unchanged."""
    recs = [record(), record("What organ is shown in this image?", "the liver", image=False)]
    encoded = [enc.encode(r, with_answers=True) for r in recs]
    items = [
        item(e.input_ids, e.labels, image=torch.zeros(3, 2, 2) if r.has_image else None)
        for e, r in zip(encoded, recs, strict=True)
    ]
    batch = Collator(pad_token_id=tok.pad_token_id, padding_side="right")(items)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row, :n].tolist() == e.labels
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert int(batch["attention_mask"][row].sum()) == n
    assert int((batch["input_ids"] == enc.image_token_id).sum()) == N_IMG * batch["pixel_values"].shape[0]
