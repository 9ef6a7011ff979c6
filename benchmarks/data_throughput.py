"""Data loading speed against the demo training step, and memory to index a 100k-record file.

- loader: samples/s of ``VQADataset.__getitem__`` (decode, transform, tokenise) + ``Collator`` over
  the demo's phantom SLAKE training split, with the demo model's tokenizer and image transform, at
  ``num_workers`` 0 and 2 (timed from the second batch, so worker start-up is not counted);
- consumption: samples/s of the demo training step (forward + backward + AdamW with LoRA on a
  batch of 16, the loop of benchmarks/pipeline_overhead.py), measured in the same run;
- ``loader_over_consumption``: loader / consumption at the demo's ``num_workers`` (0); the
  figures for 0 and 2 workers are reported too (target >= 5: data loading is not the bottleneck);
- ``index_peak_rss_mb``: peak RSS growth of a fresh process while the SLAKE reader indexes a
  100k-record ``train.json`` (flat, no image opened), measured with ``VmHWM`` from /proc.

    python benchmarks/data_throughput.py [--json] [--batches 60] [--records 100000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

BATCH = 16


def build():
    """The demo model (tokenizer, transform, LoRA as in the instruct stage) and its SLAKE data."""
    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect

    cfg = load_config(
        REPO / "experiments" / "demo.yaml", [f"output_dir={REPO}/outputs/bench-data", f"data.batch_size={BATCH}"]
    )
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    dm = connect(build_datamodule(cfg, ["phantom_slake"]), built)
    dm.prepare_data()
    return cfg, built, dm


def loader_rate(dm, *, num_workers: int, batches: int) -> float:
    """Samples/s of dataset items + collation through a DataLoader, from the second batch on."""
    from torch.utils.data import DataLoader, RandomSampler

    from datamodules.dataset import Collator

    dataset = dm.dataset("train", with_answers=True)
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=RandomSampler(dataset, num_samples=BATCH * (batches + 1)),
        num_workers=num_workers,
        collate_fn=Collator(pad_token_id=dm.tokenizer.pad_token_id, padding_side="right"),
    )
    it = iter(loader)
    next(it)  # worker start-up and first-touch costs are not throughput
    start = time.perf_counter()
    samples = sum(len(batch["records"]) for batch in it)
    return samples / (time.perf_counter() - start)


def consumption_rate(cfg, built, dm, *, steps: int) -> float:
    """Samples/s of the demo's training step (LoRA + connector, AdamW, clipping, schedule)."""
    from pipeline_overhead import plain_steps

    from pipeline.trainable import add_lora, set_trainable

    add_lora(built.model, cfg.stages.instruct.lora)
    set_trainable(built.model, ["connector", "lora"])
    batch = next(iter(dm.train_dataloader()))
    seconds = plain_steps(built.model, batch, steps, lr=2e-3)
    return BATCH / seconds


INDEX_CHILD = """
import gc, sys, time
sys.path.insert(0, {repo!r})
from datamodules.problems import ProblemLog
from datamodules.readers.slake import read_slake

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))

gc.collect()
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    open('/proc/self/clear_refs', 'w').write('5')
except OSError:
    pass
before = status('VmRSS:')
start = time.perf_counter()
records = read_slake({root!r}, 'train', problems=ProblemLog(), check_images=False)
seconds = time.perf_counter() - start
print(len(records), (status('VmHWM:') - before) / 2**20, seconds)
"""


def index_peak(records: int) -> dict:
    """Peak RSS growth (MB) of a fresh process indexing a ``records``-long SLAKE-style train.json."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = (
            {
                "img_id": i % 642,
                "img_name": f"xmlab{i % 642}/source.jpg",
                "question": f"Which organ is the largest in image {i}?",
                "answer": ["Liver", "Yes", "No", "CT"][i % 4],
                "q_lang": "en",
                "location": "Abdomen",
                "modality": "CT",
                "answer_type": "OPEN" if i % 4 in (0, 3) else "CLOSED",
                "base_type": "vqa",
                "content_type": "Organ",
                "triple": ["vhead", "_", "_"],
                "qid": i,
            }
            for i in range(records)
        )
        path = Path(tmp) / "train.json"
        with open(path, "w") as f:  # written row by row: the parent's memory is not the figure
            f.write("[\n")
            f.writelines(("," if i else "") + json.dumps(row) + "\n" for i, row in enumerate(rows))
            f.write("]\n")
        size_mb = path.stat().st_size / 2**20
        out = subprocess.run(
            [sys.executable, "-c", INDEX_CHILD.format(repo=str(REPO), root=tmp)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    return {
        "index_records": int(out[0]),
        "index_peak_rss_mb": float(out[1]),
        "index_seconds": float(out[2]),
        "index_file_mb": size_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed")
    parser.add_argument("--records", type=int, default=100_000, help="records in the indexed annotation file")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg, built, dm = build()
    loader = {n: loader_rate(dm, num_workers=n, batches=args.batches) for n in (0, 2)}
    consumption = consumption_rate(cfg, built, dm, steps=args.steps)
    result = {
        "loader_over_consumption": loader[0] / consumption,
        "loader_over_consumption_workers0": loader[0] / consumption,
        "loader_over_consumption_workers2": loader[2] / consumption,
        "loader_samples_per_s_workers0": loader[0],
        "loader_samples_per_s_workers2": loader[2],
        "consumption_samples_per_s": consumption,
        "batch_size": BATCH,
        **index_peak(args.records),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"loader (workers 0)      {loader[0]:8.1f} samples/s")
    print(f"loader (workers 2)      {loader[2]:8.1f} samples/s")
    print(f"training step consumes  {consumption:8.1f} samples/s")
    print(
        f"loader_over_consumption = {result['loader_over_consumption']:.2f} (workers 0), "
        f"{result['loader_over_consumption_workers2']:.2f} (workers 2)  (target >= 5)"
    )
    print(
        f"index_peak_rss_mb = {result['index_peak_rss_mb']:.1f} for {result['index_records']:,} records "
        f"({result['index_file_mb']:.1f} MB file, {result['index_seconds']:.2f} s)"
    )


if __name__ == "__main__":
    main()
