"""A stage's own conversation preset (``stages.<name>.conversation``): Med-MoE's stage 1 trains on LLaVA's
``plain`` prompts while later stages use ``phi`` (model.llm.conversation). The preset reaches the tokenizer
through ``build_model(conversation=...)``; the stage's training batches and its evaluation prompts come from
that tokenizer, and the run's final evaluation uses the last stage's preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from datamodules.encoding import ConversationEncoder
from datamodules.records import Record
from pipeline.config import ConfigError, load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
EXCHANGE = [{"role": "user", "content": "<image>\nWhich organ?"}, {"role": "assistant", "content": "The lung."}]
PLAIN = "<image>The lung.\n"  # LLaVA preprocess_plain: the instruction text is dropped
PHI = f"{CURIOUS_USER} USER: <image>\nWhich organ? ASSISTANT: The lung.<|endoftext|>"


def tokenizer(*overrides: str, conversation: str | None = None):
    """The tokenizer of the tiny Phi model as ``build_model`` sets it up (no weights loaded)."""
    cfg = load_config(DEMO, ["model.llm.path=tiny:phi", *overrides], check_paths=False)
    return build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", conversation=conversation).tokenizer


def test_a_stage_preset_replaces_the_model_template() -> None:
    model_template = tokenizer("model.llm.conversation=phi")
    stage_template = tokenizer("model.llm.conversation=phi", conversation="plain")
    assert model_template.apply_chat_template(EXCHANGE, tokenize=False) == PHI
    assert stage_template.apply_chat_template(EXCHANGE, tokenize=False) == PLAIN
    # the stage's preset also wins over a jinja chat_template (and over the tokenizer's own template)
    jinja = "model.llm.chat_template='{% for m in messages %}{{ m.content }}|{% endfor %}'"
    assert tokenizer(jinja).apply_chat_template(EXCHANGE, tokenize=False) == "<image>\nWhich organ?|The lung.|"
    assert tokenizer(jinja, conversation="phi").apply_chat_template(EXCHANGE, tokenize=False) == PHI


def test_the_encoder_follows_the_stage_preset() -> None:
    record = Record(
        id="r", dataset="d", split="train", question="Which organ?", answer="The lung.", answer_type="open",
        image_path="x.png",
    )  # fmt: skip
    for conversation, text in (("plain", PLAIN), (None, PHI)):
        tok = tokenizer("model.llm.conversation=phi", conversation=conversation)
        encoder = ConversationEncoder(tok, num_image_tokens=1)
        sample = encoder.encode(record, with_answers=True)
        assert tok.decode(sample.input_ids) == text
        answer = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != -100]
        # the labels: the answer and what ends it (phi: with the space after "ASSISTANT:", as the encoder pieces it)
        assert tok.decode(answer).lstrip() == text[text.index("The lung.") :]


def test_an_unknown_stage_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="key 'stages.align.conversation': 'plian' is not one of vicuna_v1"):
        load_config(DEMO, ["stages.align.conversation=plian"], check_paths=False)


# -- tiny runs ---------------------------------------------------------------------------------------------------


def run_overrides(tmp: Path) -> list[str]:
    return [
        f"output_dir={tmp}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
        "mlflow.experiment_name=stage-conversation",
        "mlflow.system_metrics=false",
        "mlflow.register_model=false",
        "model.llm.path=tiny:phi",
        "model.llm.conversation=phi",
        "stages.align.conversation=plain",
        "data.datasets.phantom_captions.synthetic.train_images=4",
        "data.datasets.phantom_captions.synthetic.val_images=2",
        "data.datasets.phantom_slake.synthetic.train_images=4",
        "data.datasets.phantom_slake.synthetic.val_images=2",
        "data.datasets.phantom_slake.synthetic.test_images=1",
        "data.datasets.phantom_slake.synthetic.questions_per_image=2",
        "data.batch_size=2",
        "stages.align.max_steps=1",
        "stages.instruct.max_steps=1",
        "evaluation.max_new_tokens=1",
        "trainer.save_checkpoints=false",
        "trainer.enable_progress_bar=false",
    ]


class FirstBatch:
    """Decodes the first training batch's first sample of each stage (image tokens collapsed to one)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[str, str]] = {}

    def callbacks(self, name: str) -> list:
        import lightning as L

        texts = self.texts

        class Capture(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if name not in texts:
                    tok = trainer.datamodule.tokenizer
                    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
                    labels = batch["labels"][0][batch["attention_mask"][0].bool()].tolist()
                    texts[name] = (decode(tok, ids), tok.decode([t for t in labels if t != -100]))

        return [Capture()]


def decode(tok, ids: list[int]) -> str:
    image = tok.convert_tokens_to_ids("<image>")
    kept = [t for i, t in enumerate(ids) if t != image or i == 0 or ids[i - 1] != image]
    return tok.decode(kept)


@pytest.fixture
def connected(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every datamodule the runner connects for a stage's training (``run_stage``) or an evaluation
    (``evaluate_model``), in order; the pre-flight check's is left out."""
    import inspect

    import pipeline.runner as runner

    seen: list = []
    connect = runner.connect

    def recording(dm, built):
        dm = connect(dm, built)
        if inspect.stack()[1].function in ("run_stage", "evaluate_model"):
            seen.append(dm)
        return dm

    monkeypatch.setattr(runner, "connect", recording)
    return seen


def eval_prompt(dm) -> tuple[str, str]:
    """The generation prompt of the first test record and that record's question."""
    record = dm.split_records("test")[0]
    return decode(dm.tokenizer, dm.encoder.encode(record, with_answers=False).input_ids), record.question


@pytest.mark.slow
def test_stage_one_trains_and_evaluates_plain_stage_two_phi(tmp_path: Path, connected: list) -> None:
    from pipeline.runner import run_experiment

    torch.set_num_threads(1)
    batches = FirstBatch()
    cfg = load_config(DEMO, run_overrides(tmp_path))
    result = run_experiment(cfg, extra_callbacks=batches.callbacks)
    assert [s.name for s in result.stages] == ["align", "instruct"]

    text, answer = batches.texts["align"]  # a caption exchange, plain: <image> + caption + "\n"
    assert text == f"<image>{answer}" and answer.endswith("\n") and "USER" not in text
    text, answer = batches.texts["instruct"]  # a VQA exchange, phi (the labels: " answer<|endoftext|>")
    assert text.startswith(f"{CURIOUS_USER} USER: <image>\n") and text.endswith(f" ASSISTANT:{answer}")
    assert answer.startswith(" ") and answer.endswith("<|endoftext|>")

    assert len(connected) == 4  # align: training, evaluation; instruct: training, evaluation
    prompt, _ = eval_prompt(connected[1])
    assert prompt == "<image>"  # plain's generation prompt: the image alone
    prompt, question = eval_prompt(connected[3])
    assert prompt == f"{CURIOUS_USER} USER: <image>\n{question} ASSISTANT:"


@pytest.mark.slow
def test_the_final_evaluation_uses_the_last_stage_preset(tmp_path: Path, connected: list) -> None:
    from pipeline.runner import run_experiment

    torch.set_num_threads(1)
    cfg = load_config(DEMO, [*run_overrides(tmp_path), "evaluation.after_each_stage=false"])
    OmegaConf.set_readonly(cfg, False)
    with open_dict(cfg):
        del cfg.stages["instruct"]  # stage 1 alone: its plain preset is the last stage's
    OmegaConf.set_readonly(cfg, True)
    result = run_experiment(cfg)
    assert result.evaluation is not None and len(connected) == 2  # training, then the final evaluation
    assert eval_prompt(connected[1])[0] == "<image>"
