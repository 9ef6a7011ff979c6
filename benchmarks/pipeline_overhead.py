"""Time per training step: the Lightning stage module vs a plain PyTorch loop, side by side.

Same model (the demo's tiny CLIP + tiny Llama with LoRA), same batch, same AdamW, same schedule and
gradient clipping. Rounds alternate between the two so drift on a shared machine hits both; the
figure is the ratio of the medians.

    python benchmarks/pipeline_overhead.py [--steps 30] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(batch_size: int):
    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from pipeline.runner import build_datamodule, connect
    from pipeline.trainable import add_lora, set_trainable

    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [f"output_dir={REPO}/outputs/bench-overhead", f"data.batch_size={batch_size}"],
    )
    built = build_model(cfg.model, cache_dir=cfg.cache_dir)
    add_lora(built.model, cfg.stages.instruct.lora)
    set_trainable(built.model, ["connector", "lora"])
    dm = connect(build_datamodule(cfg, ["phantom_slake"]), built)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    return built, batch


def plain_steps(model, batch, steps: int, lr: float) -> float:
    """Seconds per step of a hand-written loop doing what the Lightning module does."""
    from lightningmodules.schedules import lr_lambda
    from lightningmodules.vlm_module import model_inputs

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total_steps=steps, warmup_steps=1, scheduler="cosine", min_lr_ratio=0.0)
    )
    model.train()
    inputs = model_inputs(batch)
    start = 0.0
    for step in range(steps + 2):
        if step == 2:  # the first steps pay for allocator warm-up in both variants
            start = time.perf_counter()
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / steps


class _StepClock:
    """Lightning callback: wall time from the start of step 3 to the end of the last step."""

    def __init__(self, steps: int) -> None:
        import lightning as L

        class Clock(L.Callback):
            def __init__(self) -> None:
                self.start = 0.0
                self.end = 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if batch_idx == 2:
                    self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.end = time.perf_counter()

        self.callback = Clock()
        self.steps = steps

    def per_step(self) -> float:
        return (self.callback.end - self.callback.start) / self.steps


def lightning_steps(model, tokenizer, batch, steps: int, lr: float) -> float:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightningmodules.vlm_module import VLMModule

    module = VLMModule(model=model, tokenizer=tokenizer, lr=lr, warmup_ratio=0.0, scheduler="cosine")
    clock = _StepClock(steps)
    loader = DataLoader([batch] * (steps + 2), batch_size=None, shuffle=False)  # the same batch each step
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        callbacks=[clock.callback],
    )
    trainer.fit(module, train_dataloaders=loader)
    return clock.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    built, batch = build(args.batch_size)
    initial = {k: v.clone() for k, v in built.model.state_dict().items()}
    plain, lightning = [], []
    for _ in range(args.rounds):
        built.model.load_state_dict(initial)
        plain.append(plain_steps(built.model, batch, args.steps, lr=2e-3))
        built.model.load_state_dict(initial)
        lightning.append(lightning_steps(built.model, built.tokenizer, batch, args.steps, lr=2e-3))
    result = {
        "lightning_over_plain": statistics.median(lightning) / statistics.median(plain),
        "plain_ms_per_step": 1000 * statistics.median(plain),
        "lightning_ms_per_step": 1000 * statistics.median(lightning),
        "steps": args.steps,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "tokens_per_sample": int(batch["input_ids"].shape[1]),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"plain loop     {result['plain_ms_per_step']:.1f} ms/step")
        print(f"Lightning      {result['lightning_ms_per_step']:.1f} ms/step")
        print(f"lightning_over_plain = {result['lightning_over_plain']:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
