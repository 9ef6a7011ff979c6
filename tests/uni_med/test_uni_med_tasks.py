"""The six tasks: prompt templates, synthetic data, task ids reaching the connector, and batches that mix
text-only and image samples in training and in batched generation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from datamodules.prompts import TEMPLATES, PromptTemplates
from datamodules.records import Record
from datamodules.specs import TASK_IDS, TASKS


def record(task: str, question: str, answer: str = "x", **extra) -> Record:
    return Record(
        id=f"r-{task}",
        dataset="d",
        split="train",
        question=question,
        answer=answer,
        answer_type="open",
        task=task,
        image_path=None if task == "qa" else "img.png",
        extra=extra,
    )


def test_task_ids_are_positions_in_tasks() -> None:
    assert TASK_IDS == {
        "vqa": 0,
        "refer": 1,
        "identify": 2,
        "caption": 3,
        "cls": 4,
        "qa": 5,
        **{t: i for i, t in enumerate(TASKS) if i >= 6},
    }


def test_evaluation_uses_the_first_template_and_training_draws_all() -> None:
    prompts = PromptTemplates()
    refer = record("refer", "Where is the liver?", "{<10><20><30><40>}", organ="Liver")
    identify = record("identify", "What is in {<10><20><30><40>}?", "Liver")
    assert prompts.render(refer) == "Where is the liver?"  # the reader's own question = template 0
    assert prompts.render(identify) == "What is in {<10><20><30><40>}?"
    rng = random.Random(0)
    seen = {prompts.render(refer, rng) for _ in range(60)}
    assert seen == {t.format(object="liver") for t in TEMPLATES["refer"]}
    assert {prompts.render(identify, rng) for _ in range(60)} == {
        t.format(box="{<10><20><30><40>}") for t in TEMPLATES["identify"]
    }
    vqa = record("vqa", "Is this a CT scan?")
    assert {prompts.render(vqa, rng) for _ in range(60)} == {
        t.format(question="Is this a CT scan?") for t in TEMPLATES["vqa"]
    }


def test_templates_keep_answers_and_skip_missing_fields() -> None:
    prompts = PromptTemplates()
    refer_without_organ = record("refer", "Where is it?")
    assert prompts.render(refer_without_organ, random.Random(0)) == "Where is it?"  # no {object}: unchanged
    grounding = record("grounding", "Segment the liver.")
    assert prompts.apply(grounding, random.Random(0)) is grounding  # no templates for the task
    caption = record("caption", "Describe this image.", "CT scan of the chest. No lesion is seen.")
    out = prompts.apply(caption, random.Random(3))
    assert out.answer == caption.answer and out.turns[0].answer == caption.answer
    assert out.question in TEMPLATES["caption"] and out.turns[0].question == out.question


def test_synthetic_cls_and_text_only_qa(tmp_path: Path) -> None:
    from datamodules.readers.conversation import read_conversation
    from datamodules.writers.conversation import write_conversation

    write_conversation(tmp_path / "cls", kind="cls", n_train=12, n_val=0, n_test=0, seed=2)
    write_conversation(tmp_path / "qa", kind="qa", n_train=5, n_val=0, n_test=0, seed=3, questions_per_image=6)
    cls = read_conversation(tmp_path / "cls", "train", task="cls")
    assert len(cls) == 12 and all(r.has_image for r in cls)
    labels = {r.answer for r in cls}
    assert labels <= {f"{s} {b}" for s in ("normal", "abnormal") for b in ("brain", "chest", "abdomen")}
    assert len(labels) >= 3
    qa = read_conversation(tmp_path / "qa", "train", task="qa")
    assert len(qa) == 10 and not any(r.has_image for r in qa)  # 2 questions per report, no image
    assert not list((tmp_path / "qa" / "images").iterdir())
    for r in qa:  # the report in the question holds the answer
        report, _question = r.question.split("\n")
        assert report.split(" scan of the ")[0] in ("CT", "MRI", "X-Ray")


class SpyConnector(torch.nn.Module):
    """Records the task ids each call receives; wraps the real connector."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[list[int]] = []

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None, **kw: object) -> torch.Tensor:
        self.calls.append(task_ids.tolist())
        return self.inner(features, task_ids=task_ids, **kw)


@pytest.fixture(scope="module")
def tiny_cmoe(cache_dir, tiny_llama, tiny_clip):
    from pipeline.config import load_config
    from pipeline.model_factory import build_model

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "experiments" / "uni_med" / "tiny.yaml",
        ["model.connector.weighting=hard"],
    )
    torch.manual_seed(0)
    return build_model(cfg.model, cache_dir=cache_dir)


def mixed_items(built, *, with_answers: bool):
    """qa (text only), refer, cls, qa, vqa: encoded by the real dataset class."""
    from PIL import Image

    from datamodules.dataset import VQADataset
    from datamodules.encoding import ConversationEncoder

    image = Image.new("RGB", (64, 64), (90, 90, 90))
    records = [
        record("qa", "CT scan of the chest. No lesion is seen.\nIs this a CT scan?", "Yes"),
        record("refer", "Where is the heart?", "{<40><45><60><70>}", organ="Heart"),
        record("cls", "What is the category of this image?", "normal chest"),
        record("qa", "MRI scan of the brain. No lesion is seen.\nHow many lesions are in this image?", "0"),
        record("vqa", "Is this a CT scan?", "Yes"),
    ]
    for r in records:
        if r.has_image:
            r.image_path, r.image_bytes = None, _png(image)
    encoder = ConversationEncoder(built.tokenizer, num_image_tokens=built.model.num_image_tokens)
    ds = VQADataset(
        records,
        encoder=encoder,
        transform=built.transform,
        with_answers=with_answers,
        task_ids=TASK_IDS,
        prompts=PromptTemplates(),
        random_prompts=with_answers,
    )
    return [ds[i] for i in range(len(ds))]


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_text_and_image_batch_trains_and_task_ids_reach_the_connector(tiny_cmoe) -> None:
    from datamodules.dataset import Collator
    from lightningmodules.models.moe import moe_context

    model = tiny_cmoe.model
    spy = SpyConnector(model.connector)
    model.connector = spy
    try:
        batch = Collator(pad_token_id=tiny_cmoe.tokenizer.pad_token_id, padding_side="right")(
            mixed_items(tiny_cmoe, with_answers=True)
        )
        assert batch["task_ids"].tolist() == [5, 1, 4, 5, 0]
        assert batch["image_task_ids"].tolist() == [1, 4, 0]  # only the samples with an image
        assert batch["pixel_values"].shape[0] == 3
        model.train()
        with moe_context(model) as context:
            out = model(
                **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_task_ids")}
            )
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert spy.calls == [[1, 4, 0]]
        # hard routing: each image went to expert (task id mod 5)
        weights = context.routing[spy.inner].dense_weights()  # (3, P, 5)
        assert weights.argmax(-1)[:, 0].tolist() == [1, 4, 0]
        # text-only samples are supervised too: their answer tokens count in the loss
        labels = batch["labels"]
        assert (labels[0] != -100).any() and (labels[3] != -100).any()
    finally:
        model.connector = spy.inner
        model.zero_grad(set_to_none=True)


def test_text_only_batch_skips_the_connector(tiny_cmoe) -> None:
    from datamodules.dataset import Collator

    model = tiny_cmoe.model
    spy = SpyConnector(model.connector)
    model.connector = spy
    try:
        items = [it for it in mixed_items(tiny_cmoe, with_answers=True) if it["pixel_values"] is None]
        batch = Collator(pad_token_id=tiny_cmoe.tokenizer.pad_token_id, padding_side="right")(items)
        assert batch["pixel_values"] is None and batch["image_task_ids"].numel() == 0
        out = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "image_task_ids")}
        )
        assert torch.isfinite(out.loss) and spy.calls == []
    finally:
        model.connector = spy.inner


def test_mixed_batch_generation_equals_one_by_one(tiny_cmoe) -> None:
    """Left-padded batched greedy decoding of text-only and image prompts matches decoding each alone."""
    from datamodules.dataset import Collator
    from lightningmodules.models.language import decode_answers, stop_token_ids

    model = tiny_cmoe.model.eval()
    tok = tiny_cmoe.tokenizer
    collate = Collator(pad_token_id=tok.pad_token_id, padding_side="left")
    stops = model.stop_token_ids(stop_token_ids(tok))  # the evaluation's: eos, end-of-turn, eos list
    items = mixed_items(tiny_cmoe, with_answers=False)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_task_ids")

    def generate(batch):
        ids = model.generate(
            **{k: batch[k] for k in keys},
            max_new_tokens=6,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        return decode_answers(tok, ids, stops)  # as the evaluation decodes: cut at the first stop id

    together = generate(collate(items))
    alone = [generate(collate([it]))[0] for it in items]
    assert together == alone
    assert all(together[i] for i in (0, 3))  # the text-only prompts produce text
