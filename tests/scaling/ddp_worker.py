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

from pipeline.config import load_config
from pipeline.runner import run_experiment
from pipeline.strategies import shutdown_distributed


def main() -> int:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    rank = int(os.environ.get("RANK", 0))
    models: dict[str, torch.nn.Module] = {}
    run_experiment(cfg, on_stage_start=models.__setitem__)  # each stage's model, trained in place
    for name, model in models.items():  # as the hand-over has it: trained, LoRA merged
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save(state, Path(cfg.output_dir) / "stages" / name / f"rank{rank}.pt")
    shutdown_distributed()  # as `medpipe train` does after a successful run
    return 0


if __name__ == "__main__":
    sys.exit(main())
