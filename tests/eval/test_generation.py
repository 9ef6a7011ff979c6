"""Batched greedy generation (left padding, KV cache) gives what one-at-a-time generation gives."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_batched_generation_equals_sequential(slake_root, tiny_llama, tiny_clip) -> None:
    from datamodules.dataset import Collator
    from lightningmodules.models.language import stop_token_ids
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect

    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [f"data.datasets.phantom_slake.path={slake_root}", "data.datasets.phantom_slake.synthetic=null"],
    )
    torch.manual_seed(0)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    built.model.eval()
    dm = connect(build_datamodule(cfg, ["phantom_slake"]), built)
    dataset = dm.dataset("test", with_answers=False)
    items = [dataset[i] for i in range(6)]
    lengths = {len(it["input_ids"]) for it in items}
    assert len(lengths) > 1  # prompts of different lengths, so left padding is exercised
    collate = Collator(pad_token_id=built.tokenizer.pad_token_id, padding_side="left")
    tok = built.tokenizer
    stops = built.model.stop_token_ids(stop_token_ids(tok))  # the evaluation's: eos, end-of-turn, eos list

    def generate(batch):
        return built.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=8,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )

    batched = generate(collate(items))
    for row, item in zip(batched, items, strict=True):
        single = generate(collate([item]))[0]
        expected = single.tolist()
        got = row.tolist()[: len(expected)]
        assert got == expected
        # after the sequence ends, the batched row only holds padding
        assert all(t == tok.pad_token_id for t in row.tolist()[len(expected) :])
