"""Run an experiment as ``medpipe train`` does and SIGKILL the process after optimiser step K of one stage
(a hard crash: no exception handlers, no flushing). Usage: python kill_at_step.py STAGE K CONFIG [key=value ...]

The kill is a Lightning callback added to that stage's trainer through ``run_experiment(extra_callbacks=...)``."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from pipeline.config import load_config
from pipeline.runner import run_experiment


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    stage, step, config, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    run_experiment(cfg, extra_callbacks=lambda name: [KillAt(int(step))] if name == stage else [])
