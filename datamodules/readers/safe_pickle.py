"""Opt-in loading of annotation pickles (PathVQA's original release).

Unpickling can execute code stored in the file, so readers refuse pickles unless the user sets
``allow_pickle: true``. Even then the file is read with an unpickler that only resolves plain
containers, strings and numbers (and numpy's array and scalar reconstructors): a pickle that names
any other callable is refused, naming it, instead of running it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from datamodules.problems import file_error

REFUSAL = (
    "is a Python pickle: loading it executes code stored in the file, so medpipe refuses it unless "
    "you opt in with allow_pickle: true (e.g. data.datasets.{name}.allow_pickle=true) for a file you "
    "trust; the hub parquet export needs no opt-in"
)

_ALLOWED = {
    ("builtins", name)
    for name in (
        "dict",
        "list",
        "set",
        "frozenset",
        "tuple",
        "str",
        "int",
        "float",
        "bool",
        "bytes",
        "bytearray",
        "complex",
    )
} | {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: annotation pickles hold plain data only")


def load_pickle(path: Path, *, allow_pickle: bool, dataset: str) -> Any:
    """The unpickled object, or a DataError explaining the refusal (no opt-in) or the failure."""
    if not allow_pickle:
        raise file_error(path, "allow_pickle", f"{path.name} " + REFUSAL.format(name=dataset), "pickle_refused")
    try:
        with open(path, "rb") as f:
            return _DataOnlyUnpickler(f).load()
    except FileNotFoundError:
        raise file_error(path, "<file>", "file not found", "missing_file") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise file_error(path, "<pickle>", f"unreadable pickle ({e})", "malformed_pickle") from None
