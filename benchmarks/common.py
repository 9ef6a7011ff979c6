"""Shared pieces of the benchmarks: command line, interleaved rounds, medians with spread, load average, JSON.

Every benchmark

- runs its sides in interleaved rounds: each round runs every side once, the order rotating from round to
  round (two sides: alternating), so drift on a shared machine hits every side alike;
- reports medians with their spread (``{"median", "min", "max", "q1", "q3", "n"}``), ratios as the median of
  the per-round ratios (each round's sides ran back to back);
- records the 1-, 5- and 15-minute load average at its start and end (``load_average``), the intra-op
  threads (``--threads``) and the machine;
- takes ``--json`` (one JSON object on stdout), ``--out FILE`` (the same object into a file) and
  ``--reduced`` (a seconds-long run on tiny sizes, for the tests: its figures are not measurements).

Running this file does nothing: it holds helpers (``make bench`` runs every ``benchmarks/*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

SPREAD_KEYS = ("median", "min", "max", "q1", "q3", "n")


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has; each adds its own sizes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the benchmark's)")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    p.add_argument("--reduced", action="store_true", help="tiny sizes, seconds: checks that it runs (tests)")
    return p


def load_average() -> list[float]:
    """1-, 5- and 15-minute load average of the machine."""
    return [round(v, 2) for v in os.getloadavg()]


def spread(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Median, min, max and quartiles of ``values`` (one per round)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("no values")
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    out = {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
    }
    return {**{k: round(v, digits) for k, v in out.items()}, "n": len(ordered)}


def round_order(names: Sequence[str], round_index: int) -> list[str]:
    """The sides' order in round ``round_index``: rotated by one each round, so every side runs in every
    position equally often (two sides: A B, B A, A B, ...)."""
    names = list(names)
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def interleaved(
    sides: dict[str, Callable[[], float | None]], *, rounds: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Each round runs every side once (order from :func:`round_order`); a side returns its own figure
    (e.g. seconds of its timed region) or None, then its wall time is used. Warm-up rounds are not kept."""
    values: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(warmup + rounds):
        for name in round_order(list(sides), r):
            start = time.perf_counter()
            figure = sides[name]()
            took = time.perf_counter() - start if figure is None else figure
            if r >= warmup:
                values[name].append(took)
    return values


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios (the two sides of a round ran back to back)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def machine(threads: int | None = None) -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def header(name: str, args: argparse.Namespace, load_start: list[float]) -> dict[str, Any]:
    """The keys every benchmark's JSON starts with (``load_average.end`` is filled by :func:`emit`)."""
    return {
        "benchmark": name,
        "reduced": bool(args.reduced),
        "rounds": args.rounds,
        "threads": args.threads,
        "load_average": {"start": load_start, "end": None},
        "machine": machine(args.threads),
        "shared_machine_note": "the machine may run other jobs (other engineers' tests): see load_average",
    }


def emit(result: dict[str, Any], args: argparse.Namespace, lines: Callable[[dict[str, Any]], list[str]]) -> None:
    """Close the result (end load average), then print it as JSON or as text, and write ``--out``."""
    result["load_average"]["end"] = load_average()
    text = json.dumps(result, indent=None)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(text)
        return
    for line in lines(result):
        print(line)
    la = result["load_average"]
    print(f"load average (1/5/15 min) {la['start']} -> {la['end']} on {result['machine']['cpu_count']} CPUs")


def fmt(s: dict[str, float], unit: str = "", digits: int = 3) -> str:
    """``median [min - max]`` of a :func:`spread`."""
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f} - {s['max']:.{digits}f}]"


class MatmulFlops(TorchDispatchMode):
    """FLOPs of the ops ``torch.utils.flop_counter`` has formulas for (mm, addmm, bmm, baddbmm, ...), without
    ``FlopCounterMode``'s module tracking (its backward hooks refuse the ``autograd.grad`` call inside the
    experts' hand-written backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def quiet() -> None:
    """Silence the libraries' progress bars and info logs (stdout stays clean for --json)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "mlflow", "medpipe"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    print(__doc__.splitlines()[0], "(helpers; nothing to run)", file=sys.stderr)
