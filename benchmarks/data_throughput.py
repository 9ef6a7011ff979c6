"""Data loading through the real DataModule at two dataset sizes: samples/s, start-up, memory, and the training
step it feeds.

The data: a SLAKE-layout dataset (``datamodules.writers.slake``, 64 phantom images) whose ``train.json`` is
grown to ``--sizes`` records (10k and 100k by default; records cycle over the images, each with its own qid),
written in a temporary folder. The loader is the one training uses: ``VQADataModule`` from the demo config
(``build_datamodule`` + ``connect`` with the demo model's tokenizer, image transform and visual-token count),
``train_dataloader()``: the ``MixtureSampler``, ``VQADataset`` items (JPEG decode, transform, chat template,
tokenisation) and the ``Collator``, at ``num_workers`` 0 (the demo's) and 2.

Per round (``--rounds``, the order rotating): for every size and worker count a fresh loader iterator, its
first batch timed apart (``first_batch_seconds``: sampler stream, worker start) and then ``--batches`` batches
timed (``loader_samples_per_s``); and the demo's training step (LoRA + connector, AdamW, clipping; the loop of
``benchmarks/pipeline_overhead.py``'s plain side) on a batch of 16 (``consumption_samples_per_s``).
``loader_over_consumption`` is the per-round ratio (target >= 5: loading is not the bottleneck).

Memory: one fresh process per size builds the model and the DataModule, reads the split and draws
``--batches`` batches (workers 0); ``VmRSS`` before reading, after, and ``VmHWM`` (peak) from /proc.
``rss_ratio``: the larger size's figures over the smaller's (growth = after reading and loading minus before).

    python benchmarks/data_throughput.py [--sizes 10000 100000] [--rounds 5] [--json] [--reduced]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after sys.path)

REPO = common.REPO
BATCH = 16


def label(size: int) -> str:
    return f"{size // 1000}k" if size % 1000 == 0 else str(size)


def write_datasets(tmp: Path, sizes: list[int], images: int) -> dict[int, Path]:
    """A SLAKE-layout folder per size, sharing one ``imgs`` folder; train.json grown to ``size`` records."""
    from datamodules.writers.slake import write_slake

    base = tmp / "base"
    write_slake(base, n_train=images, n_val=1, n_test=0, seed=0)
    rows = json.loads((base / "train.json").read_text())
    roots = {}
    for size in sizes:
        root = tmp / f"slake-{label(size)}"
        root.mkdir()
        (root / "imgs").symlink_to(base / "imgs", target_is_directory=True)
        for name in ("validate.json", "test.json"):
            shutil.copy(base / name, root / name)
        with open(root / "train.json", "w") as f:  # row by row: this process's memory is not the figure
            f.write("[\n")
            for i in range(size):
                f.write(("," if i else "") + json.dumps({**rows[i % len(rows)], "qid": i}) + "\n")
            f.write("]\n")
        roots[size] = root
    return roots


def config(root: Path, threads: int):
    from pipeline.config import load_config

    return load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={root.parent / 'outputs'}",
            f"data.datasets.phantom_slake.path={root}",
            "data.datasets.phantom_slake.synthetic=null",
            f"data.batch_size={BATCH}",
            f"trainer.num_threads={threads}",
        ],
    )


def datamodule(cfg, built):
    from pipeline.runner import build_datamodule, connect

    return connect(build_datamodule(cfg, ["phantom_slake"]), built)


def loader_run(dm, *, workers: int, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s of the next ``batches``) of a fresh train loader iterator."""
    dm.num_workers = workers
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
        samples += len(next(it)["input_ids"])
    rate = samples / (time.perf_counter() - start)
    del it  # workers shut down
    return first, rate


def training_step(cfg, built, dm):
    """The demo instruct stage's step (LoRA + connector trainable, AdamW, clipping) on one batch."""
    import torch

    from lightningmodules.optimization import build_optimizer
    from lightningmodules.vlm_module import model_inputs
    from pipeline.stages import stage_for

    stage = stage_for(cfg, "instruct")
    stage.prepare(built.model, {})
    stage.set_trainable(built.model)
    dm.num_workers = 0
    batch = next(iter(dm.train_dataloader()))
    inputs = model_inputs(batch)
    optim = build_optimizer(built.model.parameters(), total_steps=1000, **stage.optim_settings())
    optimizer = optim["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    built.model.train()

    def step() -> None:
        loss = built.model(**inputs).loss
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, len(batch["input_ids"])


MEMORY_CHILD = """
import json, sys, time
sys.path.insert(0, {benchmarks!r})
import common
common.quiet()
import torch
torch.set_num_threads({threads})
from pathlib import Path
from data_throughput import config, datamodule
from pipeline.model_factory import build_model

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)) / 2**20

cfg = config(Path({root!r}), {threads})
built = build_model(cfg.model, cache_dir=cfg.cache_dir)
dm = datamodule(cfg, built)
before = status('VmRSS:')
start = time.perf_counter()
dm.setup('fit')
read_seconds = time.perf_counter() - start
records = len(dm.split_records('train'))
after_read = status('VmRSS:')
dm.num_workers = 0
it = iter(dm.train_dataloader())
for _ in range({batches}):
    next(it)
print(json.dumps({{
    'records': records, 'batches_drawn': {batches}, 'rss_before_mb': before, 'rss_after_read_mb': after_read,
    'rss_mb': status('VmRSS:'), 'peak_rss_mb': status('VmHWM:'), 'read_seconds': read_seconds,
}}))
"""


def memory(root: Path, *, threads: int, batches: int) -> dict[str, Any]:
    """RSS figures of a fresh process that reads ``root``'s train split and draws ``batches`` batches."""
    code = MEMORY_CHILD.format(benchmarks=str(REPO / "benchmarks"), root=str(root), threads=threads, batches=batches)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    figures["rss_growth_mb"] = figures["rss_mb"] - figures["rss_before_mb"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000], help="train records, two sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers settings")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader run")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per round")
    parser.add_argument("--images", type=int, default=64, help="phantom images the records cycle over")
    args = parser.parse_args()
    if args.reduced:
        args.sizes, args.workers, args.batches, args.steps, args.images = [200, 2000], [0], 2, 1, 4
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 5
    args.threads = args.threads or 1
    common.quiet()
    import torch

    torch.set_num_threads(args.threads)
    result = common.header("data_throughput", args, common.load_average())
    from pipeline.model_factory import build_model

    small, large = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp_name:
        roots = write_datasets(Path(tmp_name), [small, large], args.images)
        rss = {label(size): memory(roots[size], threads=args.threads, batches=args.batches) for size in (small, large)}
        cfg = config(roots[small], args.threads)
        built = build_model(cfg.model, cache_dir=cfg.cache_dir)
        modules, read_seconds = {}, {}
        for size in (small, large):
            modules[size] = datamodule(config(roots[size], args.threads), built)
            start = time.perf_counter()
            modules[size].setup("fit")
            read_seconds[label(size)] = round(time.perf_counter() - start, 3)
        step, batch_size = training_step(cfg, built, modules[small])
        step()  # warm-up

        def consume() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            return args.steps * batch_size / (time.perf_counter() - start)

        variants = {f"{label(s)}/workers{w}": (s, w) for s in (small, large) for w in args.workers}
        firsts: dict[str, list[float]] = {name: [] for name in variants}
        rates: dict[str, list[float]] = {name: [] for name in [*variants, "consumption"]}
        for r in range(args.rounds):
            for name in common.round_order([*variants, "consumption"], r):
                if name == "consumption":
                    rates[name].append(consume())
                    continue
                size, workers = variants[name]
                first, rate = loader_run(modules[size], workers=workers, batches=args.batches)
                firsts[name].append(first)
                rates[name].append(rate)

    def nested(values: dict[str, list[float]], digits: int) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for name, series in values.items():
            size, workers = name.split("/")
            out.setdefault(size, {})[workers] = common.spread(series, digits)
        return out

    ratio = {
        name: common.ratios(rates[name], rates["consumption"]) for name in variants
    }  # per round: loader and step ran in the same round
    growth = rss[label(large)]["rss_growth_mb"] / max(rss[label(small)]["rss_growth_mb"], 1e-9)
    result.update(
        {
            "baseline": "the demo training step's consumption (samples/s) measured in the same rounds",
            "sizes": [small, large],
            "loader_samples_per_s": nested({k: rates[k] for k in variants}, 1),
            "first_batch_seconds": nested(firsts, 3),
            "consumption_samples_per_s": common.spread(rates["consumption"], 1),
            "loader_over_consumption": nested(ratio, 3),
            "read_seconds": read_seconds,
            "rss": rss,
            "rss_ratio": {
                "records": large / small,
                "rss": round(rss[label(large)]["rss_mb"] / rss[label(small)]["rss_mb"], 3),
                "peak_rss": round(rss[label(large)]["peak_rss_mb"] / rss[label(small)]["peak_rss_mb"], 3),
                "growth": round(growth, 3),
            },
            "rss_method": "fresh process per size: /proc/self/status VmRSS before and after reading the split and "
            "drawing the batches, VmHWM = peak; growth = after - before",
            "target_loader_over_consumption": 5,
            "setup": {
                "batch_size": BATCH,
                "batches_timed": args.batches,
                "training_steps_timed": args.steps,
                "images": args.images,
                "workers": args.workers,
            },
        }
    )

    def lines(res: dict) -> list[str]:
        out = [f"real DataModule loader, batch {BATCH}, {args.rounds} rounds, {args.threads} threads"]
        for size, per_workers in res["loader_samples_per_s"].items():
            for workers, s in per_workers.items():
                out.append(
                    f"  {size:>5} records {workers:<8} {common.fmt(s, ' samples/s', 1)}, first batch "
                    f"{res['first_batch_seconds'][size][workers]['median']:.2f} s, loader/step "
                    f"{common.fmt(res['loader_over_consumption'][size][workers])}"
                )
        out.append(f"  training step consumes {common.fmt(res['consumption_samples_per_s'], ' samples/s', 1)}")
        for size, figures in res["rss"].items():
            out.append(
                f"  {size:>5} records: RSS {figures['rss_mb']:.0f} MB (growth {figures['rss_growth_mb']:.0f} MB, "
                f"peak {figures['peak_rss_mb']:.0f} MB), read {figures['read_seconds']:.2f} s"
            )
        out.append(f"  ratios large/small: {res['rss_ratio']}")
        return out

    common.emit(result, args, lines)


if __name__ == "__main__":
    main()
