"""Run an experiment like ``medpipe train`` and also keep every rank's final weights.

    torchrun --nproc_per_node=2 tests/scaling/ddp_worker.py EXPERIMENT.yaml key=value ...

Each stage's weights are saved by every rank to ``<stage dir>/rank<global rank>.pt`` (the runner's
hand-over is one file, written once), so a test can check that the ranks agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import runner
from pipeline.config import load_config
from pipeline.strategies import shutdown_distributed


def main() -> int:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    original = runner.save_handover
    rank = int(os.environ.get("RANK", 0))

    def save_per_rank(model, path, **kwargs):
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(path).parent / f"rank{rank}.pt")
        return original(model, path, **kwargs)

    runner.save_handover = save_per_rank
    runner.run_experiment(cfg)
    shutdown_distributed()  # as `medpipe train` does after a successful run
    return 0


if __name__ == "__main__":
    sys.exit(main())
