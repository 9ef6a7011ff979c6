"""Same seed, same numbers: CPU kernels and intra-op threads, the two things a seed does not fix.

Two runs with one seed still differ in the last bits of every float when (a) the intra-op thread count
differs (reductions are split differently) or (b) the CPU differs (torch picks AVX-512 or AVX2
kernels at run time, MKL and oneDNN pick their own code paths per CPU; oneDNN also runs some Linear and
LayerNorm work on CPU). Training
amplifies those bits into different models. ``trainer.num_threads`` fixes (a); ``trainer.cpu_kernels:
portable`` fixes (b) on every x86-64 CPU with AVX2 by pinning all three libraries to their AVX2 code:

- ``ATEN_CPU_CAPABILITY=avx2``: torch's own vectorised kernels (read once, at the first kernel),
- ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility mode (read when MKL initialises),
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (convolutions such as a ViT's patch embedding, some Linear work).

Each is read once per process, at the library's first kernel, so :func:`use_portable_cpu_kernels` must run
before any tensor work (the runner does it first thing through :func:`cpu_numerics`; the test suite in
conftest); :func:`check_cpu_kernels` says clearly when that was too late. GPU kernels are unaffected.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

CPU_KERNELS = ("native", "portable")
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def use_portable_cpu_kernels() -> None:
    """Pin torch, MKL and oneDNN to their AVX2 kernels for this process (x86-64 only; no-op elsewhere).

    Values already in the environment win, so a user can pin another level explicitly."""
    if not is_x86_64():
        return
    for key, value in PORTABLE_ENV.items():
        os.environ.setdefault(key, value)


def check_cpu_kernels(mode: str) -> None:
    """Fail with one clear line when ``portable`` was asked for but torch already chose wider kernels."""
    if mode != "portable" or not is_x86_64():
        return
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "DEFAULT"):
        raise RuntimeError(
            f"trainer.cpu_kernels=portable: torch already runs {capability} kernels in this process "
            "(they are chosen at the first tensor operation); start it with "
            + " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
            + " in the environment"
        )


def apply_cpu_kernels(mode: str) -> None:
    """``trainer.cpu_kernels``: ``portable`` pins the AVX2 kernels (and checks it took), ``native`` does nothing."""
    if mode == "portable":
        use_portable_cpu_kernels()
    check_cpu_kernels(mode)


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the block, restored after; ``None`` leaves torch's default."""
    import torch

    if count is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def cpu_numerics(trainer_cfg) -> Iterator[None]:
    """The ``trainer`` section's ``cpu_kernels`` (applied first) and ``num_threads`` for the block."""
    apply_cpu_kernels(trainer_cfg.cpu_kernels)
    with intra_op_threads(trainer_cfg.num_threads):
        yield


def kernel_fingerprint() -> dict[str, str]:
    """What, besides the seed, the code and the package versions (tagged apart), decides a CPU run's numbers
    (logged as MLflow tags)."""
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "auto"),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
        "intra_op_threads": str(torch.get_num_threads()),
    }
