"""Helpers of the MedPLIB tests."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "medplib" / "tiny.yaml"


def tiny_cfg(tmp: Path, *extra: str):
    from pipeline.config import load_config

    return load_config(TINY, [f"output_dir={tmp}/out", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", *extra])


def batch_of(dm, split: str, predicate, *, n: int = 4, generation: bool = False) -> dict:
    """A collated batch of the first ``n`` records of ``split`` that satisfy ``predicate``."""
    dataset = dm.dataset(split, with_answers=not generation)
    items = [dataset[i] for i, r in enumerate(dataset.records) if predicate(r)][:n]
    return dm.collator(generation)(items)
