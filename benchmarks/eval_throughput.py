"""Generated tokens/s: our batched evaluation vs one-at-a-time HF ``generate``, side by side.

Same tiny demo model, same prompts (the phantom SLAKE test split), greedy decoding with KV cache and the
evaluation's stop ids (``VLMModule.generation_settings``: never an override of the checkpoint's eos list).
The headline lets sequences stop at EOS (what evaluation does); a second figure forces every
sequence to ``--max-new-tokens`` (the decode-bound case of long answers and reports).
Batched: left-padded batches of ``--batch-size`` through ``MultimodalLM.generate``. Sequential: the
same prompts one by one through the same call. Both produce the same tokens (tests check this), so
the ratio of tokens/s is the speed-up.

    python benchmarks/eval_throughput.py [--batch-size 16] [--samples 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def setup(samples: int):
    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect

    cfg = load_config(REPO / "experiments" / "demo.yaml", [f"output_dir={REPO}/outputs/bench-eval"])
    torch.manual_seed(0)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    built.model.eval()
    dm = connect(build_datamodule(cfg, ["phantom_slake"]), built)
    dm.prepare_data()
    dataset = dm.dataset("test", with_answers=False)
    return built, [dataset[i] for i in range(min(samples, len(dataset)))]


def run(built, items, batch_size: int, max_new_tokens: int, forced: bool = False) -> tuple[float, int]:
    """Seconds and generated (non-pad) tokens for all items in batches of ``batch_size``."""
    from datamodules.dataset import Collator
    from lightningmodules.models.language import stop_token_ids

    tok = built.tokenizer
    collate = Collator(pad_token_id=tok.pad_token_id, padding_side="left")
    # the evaluation's stop ids: tokenizer eos, the template's end-of-turn token, the checkpoint's eos list
    stops = built.model.stop_token_ids(stop_token_ids(tok))
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size])
        out = built.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if forced else 0,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        tokens += int((out != tok.pad_token_id).sum())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    built, items = setup(args.samples)
    run(built, items[:4], args.batch_size, args.max_new_tokens)  # warm-up
    rates: dict[str, list[float]] = {"batched": [], "sequential": [], "batched_forced": [], "sequential_forced": []}
    tokens: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, batch_size, forced in (
            ("batched", args.batch_size, False),
            ("sequential", 1, False),
            ("batched_forced", args.batch_size, True),
            ("sequential_forced", 1, True),
        ):
            seconds, tokens[name] = run(built, items, batch_size, args.max_new_tokens, forced)
            rates[name].append(tokens[name] / seconds)
    median = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "batched_over_sequential": median["batched"] / median["sequential"],
        "batched_tokens_per_s": median["batched"],
        "sequential_tokens_per_s": median["sequential"],
        "generated_tokens": tokens["batched"],
        "generated_tokens_sequential": tokens["sequential"],
        # every sequence forced to max_new_tokens: the decode-bound case (long answers, reports)
        "forced_batched_over_sequential": median["batched_forced"] / median["sequential_forced"],
        "forced_batched_tokens_per_s": median["batched_forced"],
        "forced_sequential_tokens_per_s": median["sequential_forced"],
        "batch_size": args.batch_size,
        "samples": len(items),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"batched (batch {args.batch_size})  {result['batched_tokens_per_s']:.0f} tokens/s")
        print(f"one at a time        {result['sequential_tokens_per_s']:.0f} tokens/s")
        print(f"batched_over_sequential = {result['batched_over_sequential']:.2f}  (target >= 3)")
        print(
            f"forced to {args.max_new_tokens} new tokens: batched {result['forced_batched_tokens_per_s']:.0f}, "
            f"one at a time {result['forced_sequential_tokens_per_s']:.0f} tokens/s, "
            f"ratio {result['forced_batched_over_sequential']:.2f}"
        )


if __name__ == "__main__":
    main()
