"""Run ``medpipe train`` and SIGKILL the process after optimiser step K of one stage (a hard crash:
no exception handlers, no flushing). Usage: python kill_at_step.py STAGE K CONFIG [key=value ...]"""

from __future__ import annotations

import os
import signal
import sys

import lightning as L

from pipeline import runner
from pipeline.cli import main


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    stage, step, *argv = sys.argv[1:]
    build_trainer = runner.build_trainer

    def build_with_kill(*args, callbacks=None, root_dir=".", **kwargs):
        if os.path.basename(str(root_dir)) == stage:
            callbacks = [*(callbacks or []), KillAt(int(step))]
        return build_trainer(*args, callbacks=callbacks, root_dir=root_dir, **kwargs)

    runner.build_trainer = build_with_kill
    sys.exit(main(["train", *argv]))
