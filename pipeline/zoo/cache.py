"""The tiny-model cache: one folder per build key, built once, atomically.

The key digests everything that decides the bytes of a build (:func:`build_inputs`), so a change to the
zoo's code, the sources it reads, the library versions or the CPU kernels builds afresh, and two machines
that agree on all of them build the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from medcore.choices import TINY_LLM_FAMILIES, TINY_TOWERS
from medcore.paths import default_cache_dir

log = logging.getLogger(__name__)

TINY_VERSION = "v4"  # bump when a build changes in a way the source digest below cannot see
# Builds pretrain on one intra-op thread: the result depends on the thread count (reductions split
# differently), so a fixed count makes the cache the same on every machine with the same kernels.
BUILD_THREADS = 1
_ZOO = Path(__file__).resolve().parent
_REPO = _ZOO.parents[1]
# what each build reads besides the zoo's own code (the tokenizer's sources are every LM's too)
_CORPUS = ("datamodules/synthetic/phantoms.py", "datamodules/synthetic/questions.py")
# the real-architecture families (a sub-package, so editing them rebuilds only them)
_FAMILIES = tuple(
    str(p.relative_to(_REPO)) for p in sorted((_ZOO / "families").rglob("*")) if p.suffix in (".py", ".jinja")
)
BUILD_SOURCES: dict[str, tuple[str, ...]] = {
    "tokenizer": _CORPUS,
    "llama": _CORPUS,
    "qwen2": _CORPUS,
    "phi": _CORPUS,
    "stablelm": _CORPUS,
    "clip": ("datamodules/synthetic/phantoms.py", "datamodules/images.py"),
    "sam": (),
    "medsam": ("datamodules/synthetic/phantoms.py", "datamodules/images.py"),
    **dict.fromkeys(TINY_LLM_FAMILIES, _CORPUS + _FAMILIES),
    **dict.fromkeys(TINY_TOWERS, _FAMILIES),
}


def build_inputs(name: str, *, threads: int = BUILD_THREADS, sources: tuple[str, ...] | None = None) -> dict[str, str]:
    """Everything that decides the bytes of a tiny build: recipe version, the sources it runs (besides the
    zoo's code: ``sources``, default ``BUILD_SOURCES[name]``), the library versions, the CPU kernels torch
    dispatches to and the thread count (``threads``)."""
    import tokenizers
    import torch
    import transformers

    from lightningmodules.models.language import DEFAULT_CHAT_TEMPLATE

    digest = hashlib.sha256()
    for path in sorted(_ZOO.glob("*.py")):
        digest.update(path.read_bytes())
    for relative in BUILD_SOURCES[name] if sources is None else sources:
        digest.update((_REPO / relative).read_bytes())
    digest.update(DEFAULT_CHAT_TEMPLATE.encode())
    return {
        "recipe": TINY_VERSION,
        "sources": digest.hexdigest()[:16],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "auto"),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
        "build_threads": str(threads),
    }


def _digest(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def cache_key(name: str, *, threads: int = BUILD_THREADS, sources: tuple[str, ...] | None = None) -> str:
    return _digest(build_inputs(name, threads=threads, sources=sources))


def ensure_tiny(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache>/tiny/<name>-<key>``, built on first use; the key changes with anything that changes the build."""
    from pipeline.zoo.builders import BUILDERS

    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; available: {sorted(BUILDERS)}")
    cache = Path(cache_dir or default_cache_dir())
    root = cache / "tiny"
    inputs = build_inputs(name)
    target = root / f"{name}-{_digest(inputs)}"
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    log.info("building tiny:%s into %s (once per cache key)", name, target)
    with _build_threads():
        BUILDERS[name](tmp, cache)
    (tmp / "build_inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
    (tmp / ".complete").write_text(f"built in {time.perf_counter() - start:.1f}s\n")
    try:
        os.replace(tmp, target)  # atomic: concurrent builders never see half a checkpoint
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


@contextmanager
def _build_threads():
    """BUILD_THREADS for the build, and the caller's random state untouched: a run that builds its tiny models
    (cold cache) must initialise everything after that exactly as a run that finds them built."""
    import numpy as np
    import torch

    saved_threads, saved_random, saved_numpy = torch.get_num_threads(), random.getstate(), np.random.get_state()
    torch.set_num_threads(BUILD_THREADS)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(saved_threads)
        random.setstate(saved_random)
        np.random.set_state(saved_numpy)
