"""Generated tokens/s: our batched generation against transformers' own LlavaForConditionalGeneration.generate.

The model: the demo's tiny CLIP + tiny Llama + ``mlp2x_gelu`` connector, composed by ``build_model`` as
training composes it (``model.connector.aggregation=none``: LLaVA-1.5's layout, which transformers' Llava
implements; the demo's 2x2 pooling has no Llava equivalent). The same weights are converted into a
``LlavaForConditionalGeneration`` built from a ``LlavaConfig`` of the two parts' configs (vision tower ->
``model.vision_tower``, connector ``fc1/fc2`` -> ``model.multi_modal_projector.linear_1/2``, LLM body ->
``model.language_model``, LM head -> ``lm_head``; every key must match).

Sides, on the same left-padded prompts of the phantom SLAKE test split (``Collator``, the evaluation's
``<image>`` expansion), greedy decoding with KV cache, the evaluation's stop ids, ``--max-new-tokens``:

- ``ours``: ``MultimodalLM.generate`` (what evaluation calls) in batches of ``--batch-size``;
- ``hf_llava``: ``LlavaForConditionalGeneration.generate(input_ids, pixel_values, attention_mask)`` with the
  same batches and a ``GenerationConfig`` of the same settings (greedy, one beam, same eos / pad / lengths);
- ``ours_batch1``: ``MultimodalLM.generate`` one prompt at a time (our unbatched path).

Before anything is reported, the benchmark asserts that ``ours`` and ``hf_llava`` generated identical tokens
(every sequence, every round). Two modes: ``eos`` (sequences stop at a stop id, as evaluation does) and
``forced`` (``min_new_tokens = max_new_tokens``: the decode-bound case of long answers). The connector is
untrained (random weights), so with stops the answers are short.

    python benchmarks/eval_throughput.py [--batch-size 16] [--samples 64] [--rounds 5] [--json] [--reduced]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after sys.path)

REPO = common.REPO

HF_PREFIXES = (  # ours -> transformers' LlavaForConditionalGeneration
    ("vision.encoder.", "model.vision_tower."),
    ("connector.fc1.", "model.multi_modal_projector.linear_1."),
    ("connector.fc2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)


def setup(samples: int, data_dir: Path, *, test_images: int):
    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect

    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={data_dir}",
            "model.connector.aggregation=none",
            "data.datasets.phantom_slake.synthetic.train_images=1",
            "data.datasets.phantom_slake.synthetic.val_images=1",
            f"data.datasets.phantom_slake.synthetic.test_images={test_images}",
        ],
    )
    torch.manual_seed(0)
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    built.model.eval()
    dm = connect(build_datamodule(cfg, ["phantom_slake"]), built)
    dm.prepare_data()
    dataset = dm.dataset("test", with_answers=False)
    return built, [dataset[i] for i in range(min(samples, len(dataset)))]


def to_hf_llava(model):
    """transformers' LlavaForConditionalGeneration with ``model``'s weights (strict key match)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = model.vision
    if vision.select_feature != "patch" or not vision.has_cls or vision.output_norm is not None:
        raise ValueError("Llava's 'default' feature strategy is CLS dropped, no output norm")
    config = LlavaConfig(
        vision_config=vision.encoder.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_id=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act="gelu",  # nn.GELU(): exact erf GELU, as ACT2FN["gelu"]
        vision_feature_layer=vision.select_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in HF_PREFIXES:
            if key.startswith(ours):
                state[theirs + key[len(ours) :]] = value
                break
        else:
            raise KeyError(f"no Llava key for {key}")
    hf.load_state_dict(state, strict=True)
    return hf


def batches(items, batch_size: int, tokenizer):
    from datamodules.dataset import Collator

    collate = Collator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def run_ours(built, prepared, *, max_new_tokens: int, forced: bool, stops: list[int]) -> tuple[float, list]:
    """Seconds and each sequence's generated tokens (pad removed)."""
    tok = built.tokenizer
    out = []
    start = time.perf_counter()
    for batch in prepared:
        ids = built.model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if forced else 0,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )
        out.append(ids)
    seconds = time.perf_counter() - start
    return seconds, [row for ids in out for row in strip(ids, tok.pad_token_id)]


def run_hf(hf, prepared, *, max_new_tokens: int, forced: bool, stops: list[int], pad_id: int) -> tuple[float, list]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        use_cache=True,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if forced else None,
        eos_token_id=stops,
        pad_token_id=pad_id,
    )
    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for batch in prepared:
            ids = hf.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                generation_config=config,
            )
            out.append(ids[:, batch["input_ids"].shape[1] :])  # prompt + new ids -> new ids
    seconds = time.perf_counter() - start
    return seconds, [row for ids in out for row in strip(ids, pad_id)]


def strip(ids: torch.Tensor, pad_id: int) -> list[list[int]]:
    """Each row's tokens up to its first pad (the pad after a stop, or the batch's padding)."""
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(pad_id)] if pad_id in row else row)
    return rows


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.reduced:
        args.batch_size, args.samples, args.max_new_tokens = 4, 8, 4
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 5
    args.threads = args.threads or 1
    common.quiet()
    torch.set_num_threads(args.threads)
    result = common.header("eval_throughput", args, common.load_average())
    from lightningmodules.models.language import stop_token_ids

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        built, items = setup(args.samples, Path(tmp), test_images=max(2, args.samples // 4))
    hf = to_hf_llava(built.model)
    tok = built.tokenizer
    stops = built.model.stop_token_ids(stop_token_ids(tok))
    batched = batches(items, args.batch_size, tok)
    single = batches(items, 1, tok)

    sides = {
        "ours": lambda forced: run_ours(built, batched, max_new_tokens=args.max_new_tokens, forced=forced, stops=stops),
        "hf_llava": lambda forced: run_hf(
            hf, batched, max_new_tokens=args.max_new_tokens, forced=forced, stops=stops, pad_id=tok.pad_token_id
        ),
        "ours_batch1": lambda forced: run_ours(
            built, single, max_new_tokens=args.max_new_tokens, forced=forced, stops=stops
        ),
    }
    for side in sides.values():  # warm-up
        side(False)
    rates: dict[str, dict[str, list[float]]] = {mode: {name: [] for name in sides} for mode in ("eos", "forced")}
    tokens: dict[str, dict[str, int]] = {mode: {} for mode in rates}
    batch1_agreement: dict[str, float] = {}
    for r in range(args.rounds):
        for mode in ("eos", "forced"):
            generated = {}
            for name in common.round_order(list(sides), r):
                seconds, generated[name] = sides[name](mode == "forced")
                count = sum(len(row) for row in generated[name])
                rates[mode][name].append(count / seconds)
                tokens[mode][name] = count
            if generated["ours"] != generated["hf_llava"]:
                differ = sum(a != b for a, b in zip(generated["ours"], generated["hf_llava"], strict=True))
                raise SystemExit(f"{mode}: ours and HF Llava generated different tokens in {differ} sequences")
            same = sum(a == b for a, b in zip(generated["ours"], generated["ours_batch1"], strict=True))
            batch1_agreement[mode] = same / len(generated["ours"])

    def ratio(mode: str, a: str, b: str) -> dict:
        return common.spread(common.ratios(rates[mode][a], rates[mode][b]))

    result.update(
        {
            "baselines": {
                "hf_llava": "transformers LlavaForConditionalGeneration.generate, same converted weights, same "
                "batches, greedy, same stop / pad ids and lengths",
                "ours_batch1": "MultimodalLM.generate one prompt at a time",
            },
            "tokens_identical": True,  # asserted above for every sequence of every round and mode
            "ours_over_hf_llava": ratio("eos", "ours", "hf_llava"),
            "ours_over_batch1": ratio("eos", "ours", "ours_batch1"),
            "forced_ours_over_hf_llava": ratio("forced", "ours", "hf_llava"),
            "forced_ours_over_batch1": ratio("forced", "ours", "ours_batch1"),
            "tokens_per_s": {
                mode: {name: common.spread(values, 1) for name, values in per_mode.items()}
                for mode, per_mode in rates.items()
            },
            "generated_tokens": tokens,
            "batch1_same_tokens_fraction": batch1_agreement,
            "batch_size": args.batch_size,
            "samples": len(items),
            "max_new_tokens": args.max_new_tokens,
            "visual_tokens": built.model.num_image_tokens,
            "ratio_definition": "per-round ratio of generated tokens/s (> 1: ours faster)",
        }
    )

    def lines(res: dict) -> list[str]:
        out = [
            f"generation, {len(items)} prompts, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, "
            f"{args.rounds} rounds, {args.threads} threads; tokens identical to HF Llava: yes"
        ]
        for mode in ("eos", "forced"):
            tps = res["tokens_per_s"][mode]
            prefix = "" if mode == "eos" else "forced_"
            out.append(
                f"  {mode:<6} tokens/s ours {tps['ours']['median']:.0f}, HF Llava {tps['hf_llava']['median']:.0f}, "
                f"ours batch 1 {tps['ours_batch1']['median']:.0f}; "
                f"ours/HF {common.fmt(res[prefix + 'ours_over_hf_llava'])}, "
                f"ours/batch-1 {common.fmt(res[prefix + 'ours_over_batch1'])}"
            )
        return out

    common.emit(result, args, lines)


if __name__ == "__main__":
    main()
