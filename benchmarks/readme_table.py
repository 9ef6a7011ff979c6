"""Print the README's Performance rows of the benchmarks from their JSON results (``benchmarks/results/*.json``).

    python benchmarks/readme_table.py [--results DIR]

Each row quotes the median with its spread ``[min - max]`` over the rounds, names the baseline and gives the
1-minute load average at the benchmark's start and end. Write the JSON files first, e.g.
``python benchmarks/connector.py --out benchmarks/results/connector.json`` (docs/scaling.md, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f} - {s['max']:.{digits}f}]"


def load(result: dict) -> str:
    la = result["load_average"]
    return f"load {la['start'][0]:.1f} -> {la['end'][0]:.1f}"


def rounds(result: dict) -> str:
    return f"{result['rounds']} rounds, {result['threads']} thread{'s' if result['threads'] != 1 else ''}"


def connector(r: dict) -> list[str]:
    flops = r["flops"]
    ms = r["ms"]
    rows = []
    for name, weighting, target in (("soft", "soft", "<= 1.10"), ("sparse", "sparse top-2", "<= 1.30")):
        rows.append(
            f"| `benchmarks/connector.py` | CMoE {weighting} (E = {r['shape']['experts']}, paper router) fwd+bwd / "
            f"the same arithmetic in plain `nn` modules (same weights, router inputs, task half once per image; "
            f"FLOPs {flops[name]['cmoe'] / 1e9:.1f} vs {flops[name]['plain'] / 1e9:.1f} G) | {target} | "
            f"{spread(r['ratios'][name], 3)} ({ms['cmoe_' + name]['median']:.0f} vs "
            f"{ms['plain_' + name]['median']:.0f} ms); small router {spread(r['ratios'][name + '_small_router'], 3)}; "
            f"{rounds(r)}, {load(r)} |"
        )
    return rows


def pipeline_overhead(r: dict) -> list[str]:
    ms, syncs, work = r["ms_per_step"], r["syncs_per_step"], r["work"]["plain"]
    diff = r["max_abs_loss_diff"]
    losses = "every step's loss identical" if diff == 0 else f"losses within {diff:.1e}"
    setup = r["setup"]
    return [
        f"| `benchmarks/pipeline_overhead.py` | training-loop time of medpipe's `run_stage` (runner callbacks, "
        f"buffered MLflow logger on sqlite, checkpoint every {setup['checkpoint_every_n_steps']} steps, validation "
        f"each epoch) / a plain PyTorch loop doing the same work (same model, loaders, optimiser, "
        f"{work['mlflow_metrics_logged']} metrics through `MlflowClient`, {work['checkpoints']} checkpoints, "
        f"{work['val_batches']} validation batches; {losses}); demo, batch "
        f"{setup['batch_size']}, {setup['steps']} steps | <= 1.10 | {spread(r['medpipe_over_plain'], 3)} "
        f"({ms['medpipe']['median']:.1f} vs {ms['plain']['median']:.1f} ms/step); host syncs per step "
        f"{syncs['medpipe']} vs {syncs['plain']}; {rounds(r)}, {load(r)} |"
    ]


def eval_throughput(r: dict) -> list[str]:
    tps = r["tokens_per_s"]["eos"]
    head = (
        f"| `benchmarks/eval_throughput.py` | generated tokens/s, ours batched ({r['batch_size']}) / "
        f"{{baseline}} ({r['samples']} prompts, {r['visual_tokens']} visual tokens, greedy, up to "
        f"{r['max_new_tokens']} new tokens; tokens asserted identical) | {{target}} | "
    )
    return [
        head.format(
            baseline="transformers `LlavaForConditionalGeneration.generate`, same converted weights and batches",
            target=">= 0.95",
        )  # fmt: skip
        + f"{spread(r['ours_over_hf_llava'])} ({tps['ours']['median']:.0f} vs {tps['hf_llava']['median']:.0f} "
        f"tokens/s); forced to full length {spread(r['forced_ours_over_hf_llava'])}; {rounds(r)}, {load(r)} |",
        head.format(baseline="our batch-1 path (`MultimodalLM.generate` one prompt at a time)", target=">= 3")
        + f"{spread(r['ours_over_batch1'])} ({tps['ours_batch1']['median']:.0f} tokens/s at batch 1); forced "
        f"{spread(r['forced_ours_over_batch1'])}; {rounds(r)}, {load(r)} |",
    ]


def data_throughput(r: dict) -> list[str]:
    small, large = (f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in r["sizes"])
    ratio = r["loader_over_consumption"]
    rates = r["loader_samples_per_s"]
    workers = sorted(rates[small])
    measured = "; ".join(
        f"{size} records: "
        + ", ".join(f"{spread(ratio[size][w])} ({w.replace('workers', '')} workers)" for w in workers)
        for size in (small, large)
    )
    rss, rss_ratio = r["rss"], r["rss_ratio"]
    return [
        f"| `benchmarks/data_throughput.py` | samples/s of the real DataModule train loader (MixtureSampler, image "
        f"decoding, tokenisation, collator) / the demo training step's consumption "
        f"({r['consumption_samples_per_s']['median']:.0f} samples/s), SLAKE layout at {small} and {large} records "
        f"| >= 5 | {measured}; {rounds(r)}, {load(r)} |",
        f"| `benchmarks/data_throughput.py` | process RSS after reading the split and loading "
        f"{rss[small]['batches_drawn']} batches, {small} vs {large} records (fresh process each) | - | "
        f"{rss[small]['rss_mb']:.0f} vs "
        f"{rss[large]['rss_mb']:.0f} MB (ratio {rss_ratio['rss']:.2f}; growth over the process before reading "
        f"{rss[small]['rss_growth_mb']:.0f} vs {rss[large]['rss_growth_mb']:.0f} MB, ratio {rss_ratio['growth']:.1f} "
        f"for {rss_ratio['records']:.0f}x the records; reading {rss[small]['read_seconds']:.2f} vs "
        f"{rss[large]['read_seconds']:.2f} s) |",
    ]


def moe(r: dict) -> list[str]:
    ratios = r["ratios"]
    ms = r
    return [
        f"| `benchmarks/moe.py` | top-1 of 4 + meta expert / dense FFN with the same active parameters (LlamaMLP, "
        f"width 2F), fwd+bwd, {r['tokens']} tokens | <= 1.15 | {spread(ratios['moe_over_dense'], 3)} "
        f"({ms['ms_moe_top1of4_meta']:.1f} vs {ms['ms_dense_same_active']:.1f} ms); {rounds(r)}, {load(r)} |",
        f"| `benchmarks/moe.py` | our block / transformers `MixtralSparseMoeBlock` (eager experts loop), top-2 of 8, "
        f"same weights (outputs differ by {r['max_abs_diff_ours_vs_hf']:.0e}) | <= 0.95 | "
        f"{spread(ratios['ours_over_hf_mixtral'], 3)}; vs its grouped_mm experts "
        f"{spread(ratios['ours_over_hf_mixtral_grouped_mm'], 3)}; {rounds(r)}, {load(r)} |",
        f"| `benchmarks/moe.py` | our block / compute-every-expert | - | {spread(ratios['ours_over_naive'], 3)}; "
        f"peak memory {r['peak_mb_ours_top2of8']:.0f} vs {r['peak_mb_naive_top2of8']:.0f} MB |",
    ]


def gpu_check(r: dict) -> list[str]:
    dense, moe_ = r["dense"], r["moe"]
    mfu = dense["mfu"]["median"] if dense["mfu"] else None
    grouped = moe_.get("grouped_mm_over_loop")
    billions = sum(r["params"]["dense"].values()) / 1e9
    return [
        f"| `benchmarks/gpu_check.py` | {r['device']}: bf16 training of a {billions:.2f}B "
        f"LLaVA-style model, {r['tokens_per_step']} tokens/step | - | {dense['tokens_per_s']['median']:.0f} tokens/s, "
        f"MFU {mfu if mfu is None else f'{mfu:.3f}'} ({r['peak_assumption']}), peak {dense['peak_memory_gb']} GB; "
        f"DDP on one GPU {r['dense_ddp']['ddp_over_plain_median']:.3f}x the step time; upcycled MoE grouped_mm / "
        f"loop {spread(grouped, 3) if grouped else '-'} |"
    ]


ROWS = {
    "pipeline_overhead": pipeline_overhead,
    "eval_throughput": eval_throughput,
    "data_throughput": data_throughput,
    "connector": connector,
    "moe": moe,
    "gpu_check": gpu_check,
}


MISSING = {
    "gpu_check": "bf16 training of a 1.4B LLaVA-style model and its upcycled MoE on one CUDA GPU: tokens/s, MFU, "
    "grouped_mm vs per-expert loop, peak memory, one-GPU DDP; prepared, not run yet (no GPU machine so far; "
    "docs/scaling.md, GPU check)",
}


def table(results: Path) -> list[str]:
    lines = []
    for name, rows in ROWS.items():
        path = results / f"{name}.json"
        if not path.is_file():
            missing = MISSING.get(name, f"no results ({path.name} not written)")
            lines.append(f"| `benchmarks/{name}.py` | {missing} | - | - |")
            continue
        result = json.loads(path.read_text())
        lines += rows(result)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print("| benchmark | figure (baseline) | target | measured: median [min - max] |")
    print("|---|---|---|---|")
    for line in table(args.results):
        print(line)


if __name__ == "__main__":
    main()
