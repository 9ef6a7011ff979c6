"""Dataset fingerprints: record counts per split and a hash of every annotation file."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

ANNOTATION_SUFFIXES = (".json", ".jsonl", ".parquet", ".pkl", ".csv")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def annotation_files(root: Path) -> list[Path]:
    """Annotation files of a dataset folder: top-level files and ``data/`` (hub exports), not images."""
    if root.is_file():
        return [root]
    found = [p for p in root.glob("*") if p.is_file() and p.suffix in ANNOTATION_SUFFIXES]
    found += [p for p in (root / "data").glob("*") if p.is_file() and p.suffix in ANNOTATION_SUFFIXES]
    found += [p for p in (root / "qas").rglob("*") if p.is_file() and p.suffix in ANNOTATION_SUFFIXES]
    return sorted(found)


def dataset_fingerprints(datamodule: Any) -> dict[str, Any]:
    """``{dataset: {"path", "records": {split: n}, "files": {relative name: sha256}}}`` for the splits the
    DataModule has read."""
    out: dict[str, Any] = {}
    for name, spec in datamodule.datasets.items():
        root = Path(spec.path)
        counts = {split: sum(r.dataset == name for r in records) for split, records in datamodule.records.items()}
        out[name] = {
            "path": str(root),
            "format": spec.format,
            "records": counts,
            "files": {
                str(p.relative_to(root) if root.is_dir() else p.name): file_sha256(p) for p in annotation_files(root)
            },
        }
    return out


def fingerprint_params(fingerprints: dict[str, Any]) -> dict[str, str]:
    """Flat ``data.<dataset>.<split>.records`` entries and a short hash per dataset, for MLflow params."""
    params: dict[str, str] = {}
    for name, fp in fingerprints.items():
        for split, n in fp["records"].items():
            params[f"data.{name}.{split}.records"] = str(n)
        combined = hashlib.sha256("".join(f"{k}={v}" for k, v in sorted(fp["files"].items())).encode()).hexdigest()
        params[f"data.{name}.sha256"] = combined[:16]
    return params
