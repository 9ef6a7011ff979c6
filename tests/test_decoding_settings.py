"""Decoding settings from the config (``evaluation.num_beams`` / ``do_sample`` / ``temperature`` / ``top_p`` /
``top_k`` / ``repetition_penalty``) reach ``MultimodalLM.generate`` and decode as HF's ``generate`` does with
the same settings; the defaults stay strict greedy decoding.

The checkpoints are those of ``test_generation_semantics.py``: tiny random LLMs whose
``generation_config.json`` asks for sampling and a repetition penalty of 1.3 (which ours never reads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_generation_semantics import PAD, QUESTIONS, left_padded, load, prompts, save_checkpoint

from lightningmodules.models.language import stop_token_ids
from lightningmodules.models.multimodal import Decoding

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"
NEW = 12


def module_for(checkpoint: Path, *overrides: str):
    """The evaluation's module for the checkpoint's model, its settings from the demo config + ``overrides``,
    through the stage's ``module_settings`` as the runner builds it."""
    from pipeline.config import load_config
    from pipeline.stages.vlm import VLMStage

    cfg = load_config(DEMO, [f"evaluation.max_new_tokens={NEW}", *overrides], check_paths=False)
    model, tokenizer = load(checkpoint)
    return VLMStage.evaluation_module(cfg, type("Built", (), {"model": model, "tokenizer": tokenizer})())


def hf_reference(module, rows: list[list[int]], **settings) -> list[list[int]]:
    """HF's own ``generate`` on the prompt ids, one prompt at a time, with the evaluation's stop ids."""
    stops = module.model.stop_token_ids(stop_token_ids(module.tokenizer))
    out = []
    for row in rows:
        ids = torch.tensor([row])
        generated = module.model.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW,
            eos_token_id=stops,
            pad_token_id=PAD,
            **settings,
        )[0, len(row) :].tolist()
        out.append(strip_padding(generated))
    return out


def ours(module, rows: list[list[int]]) -> list[list[int]]:
    """The module's settings through ``model.generate``, one prompt at a time."""
    settings = module.generation_settings()
    return [strip_padding(module.model.generate(*left_padded([r]), **settings)[0].tolist()) for r in rows]


def strip_padding(ids: list[int]) -> list[int]:
    while ids and ids[-1] == PAD:
        ids = ids[:-1]
    return ids


@pytest.fixture(params=["llama", "phi", "qwen2", "gemma2"])
def checkpoint(request, tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / request.param, request.param)


def test_defaults_are_todays_greedy(checkpoint: Path) -> None:
    from lightningmodules.models.multimodal import decoding_config

    module = module_for(checkpoint)
    settings = module.generation_settings()
    assert settings["decoding"] == Decoding(num_beams=1, do_sample=False, repetition_penalty=None, temperature=None)
    rows = prompts(module.tokenizer, QUESTIONS)
    assert ours(module, rows) == hf_reference(module, rows, do_sample=False, repetition_penalty=1.0)
    # the GenerationConfig is the one plain greedy decoding used before the settings existed
    from transformers import GenerationConfig

    before = GenerationConfig(
        **{
            **GenerationConfig._get_default_generation_params(),
            "do_sample": False,
            "num_beams": 1,
            "use_cache": True,
            "max_length": None,
            "max_new_tokens": NEW,
            "min_new_tokens": None,
            "eos_token_id": [2, 4],
            "pad_token_id": PAD,
        }
    )
    now = decoding_config(max_new_tokens=NEW, min_new_tokens=0, eos_token_id=[2, 4], pad_token_id=PAD)
    assert now.to_dict() == before.to_dict()


def test_repetition_penalty_from_the_config_equals_hf(checkpoint: Path) -> None:
    module = module_for(checkpoint, "evaluation.repetition_penalty=1.3")
    assert module.generation_settings()["decoding"].repetition_penalty == 1.3
    rows = prompts(module.tokenizer, QUESTIONS)
    penalised = ours(module, rows)
    assert penalised == hf_reference(module, rows, do_sample=False, repetition_penalty=1.3)
    greedy = hf_reference(module, rows, do_sample=False, repetition_penalty=1.0)
    assert penalised != greedy  # the penalty is live
    # batched (left-padded) as the evaluation runs it: the same answers
    batched = module.model.generate(*left_padded(rows), **module.generation_settings())
    assert [strip_padding(r) for r in batched.tolist()] == penalised


def test_beam_search_from_the_config_equals_hf(checkpoint: Path) -> None:
    module = module_for(checkpoint, "evaluation.num_beams=2")
    rows = prompts(module.tokenizer, QUESTIONS)
    beams = ours(module, rows)
    assert beams == hf_reference(module, rows, num_beams=2, do_sample=False, repetition_penalty=1.0)
    if checkpoint.name in ("llama", "gemma2"):  # there beam search finds other answers than greedy
        assert beams != hf_reference(module, rows, do_sample=False, repetition_penalty=1.0)
    # the evaluation path decodes the same answers
    texts = module.generate_texts(dict(zip(("input_ids", "attention_mask"), left_padded(rows[:1]), strict=True)))
    stops = module.model.stop_token_ids(stop_token_ids(module.tokenizer))
    from lightningmodules.models.language import decode_answers

    assert texts == decode_answers(module.tokenizer, torch.tensor([beams[0] or [PAD]]), stops)


def test_sampling_from_the_config_equals_hf_and_follows_the_seed(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path / "llama", "llama")
    sampling = ["evaluation.do_sample=true", "evaluation.temperature=2.0", "evaluation.top_k=8"]
    module = module_for(checkpoint, *sampling, "seed=5")
    assert module.generation_settings()["decoding"].top_p is None
    rows = prompts(module.tokenizer, QUESTIONS)
    torch.manual_seed(11)
    sampled = ours(module, rows)
    torch.manual_seed(11)  # HF with the same draws: top_p 1.0, no penalty, as the config says
    reference = hf_reference(module, rows, do_sample=True, temperature=2.0, top_k=8, top_p=1.0, repetition_penalty=1.0)
    assert sampled == reference
    # the evaluation seeds its draws with the run's seed: same seed, same answers, whatever ran before
    batch = dict(zip(("input_ids", "attention_mask"), left_padded(rows), strict=True))

    def evaluate(m) -> list[str]:
        torch.rand(7)  # whatever ran before the evaluation
        m.on_test_epoch_start()
        return m.generate_texts(batch)

    first = evaluate(module)
    assert evaluate(module) == first
    assert evaluate(module_for(checkpoint, *sampling, "seed=5")) == first
    others = [evaluate(module_for(checkpoint, *sampling, f"seed={seed}")) for seed in (6, 7, 8)]
    assert any(answers != first for answers in others)


def test_sampling_keys_need_do_sample() -> None:
    from lightningmodules.models.multimodal import decoding_config

    with pytest.raises(ValueError, match="top_k apply to sampling only"):
        decoding_config(
            max_new_tokens=4, min_new_tokens=0, eos_token_id=[2], pad_token_id=0, decoding=Decoding(top_k=5)
        )
    config = decoding_config(
        max_new_tokens=4, min_new_tokens=0, eos_token_id=[2], pad_token_id=0, decoding=Decoding(do_sample=True)
    )
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0)  # null: no filter, not HF's top_k 50


@pytest.mark.parametrize(
    ("overrides", "key", "reason"),
    [
        (["evaluation.temperature=0.7"], "evaluation.temperature", "applies to sampling only"),
        (["evaluation.top_k=5"], "evaluation.top_k", "applies to sampling only"),
        (["evaluation.do_sample=true", "evaluation.top_p=1.5"], "evaluation.top_p", "must be in (0, 1]"),
        (["evaluation.do_sample=true", "evaluation.top_p=0"], "evaluation.top_p", "must be in (0, 1]"),
        (["evaluation.do_sample=true", "evaluation.temperature=0"], "evaluation.temperature", "must be > 0"),
        (["evaluation.do_sample=true", "evaluation.top_k=0"], "evaluation.top_k", "must be > 0"),
        (["evaluation.num_beams=0"], "evaluation.num_beams", "must be > 0"),
        (["evaluation.repetition_penalty=0"], "evaluation.repetition_penalty", "must be > 0"),
    ],
)
def test_decoding_keys_are_validated(overrides: list[str], key: str, reason: str) -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides, check_paths=False)
    assert str(info.value).startswith(f"command line: key '{key}': {reason}")


def test_sampling_settings_load_and_reach_the_module() -> None:
    from pipeline.config import load_config
    from pipeline.stages.vlm import GroundingStage, VLMStage

    overrides = ["evaluation.do_sample=true", "evaluation.top_p=0.9", "evaluation.num_beams=3", "seed=3"]
    cfg = load_config(DEMO, overrides, check_paths=False)
    settings = VLMStage.module_settings(cfg)
    assert settings["do_sample"] is True and settings["top_p"] == 0.9 and settings["num_beams"] == 3
    assert settings["generation_seed"] == 3 and settings["top_k"] is None
    assert GroundingStage.module_settings(cfg)["num_beams"] == 3
