"""Datasets as MLflow run inputs: the runs table's Dataset column and the run page's Datasets section.

One input per dataset a run read: name = the dataset's name in the config, digest = its fingerprint
(``data.<name>.sha256``, the hash of its annotation files, ``pipeline/fingerprints.py``), source = its folder,
profile = its format and annotation files (what the digest covers: MLflow shares one dataset entry between the
runs that log the same name and digest; each run's record counts are its ``data.<name>.<split>.records`` params),
tag ``mlflow.data.context`` = the splits the run used it for, joined with "+"
("train+val" for a stage, "test" for an evaluation run, "train+val+test" for a stage evaluated in its own run).
MLflow keeps one input per (name, digest) and run, so the context is told once, with every split.
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L

from pipeline.fingerprints import dataset_fingerprints, fingerprint_params

SPLIT_ORDER = ("train", "val", "test")


def dataset_inputs(fingerprints: dict[str, Any], contexts: dict[str, list[str]]) -> list[Any]:
    """``DatasetInput`` entities for the datasets of ``contexts`` (dataset -> splits used) with their fingerprints."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    digests = fingerprint_params(fingerprints)
    inputs = []
    for name, splits in contexts.items():
        if name not in fingerprints or not splits:
            continue
        fp = fingerprints[name]
        ordered = sorted(set(splits), key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER))
        dataset = Dataset(
            name=name,
            digest=digests[f"data.{name}.sha256"],
            source_type="local",
            source=json.dumps({"uri": fp["path"]}),
            profile=json.dumps({"format": fp["format"], "annotation_files": sorted(fp["files"])}),
        )
        inputs.append(DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", "+".join(ordered))]))
    return inputs


def used_splits(fingerprints: dict[str, Any], extra: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Dataset -> the splits it gave records to (``records`` > 0), plus ``extra`` splits per dataset."""
    used = {name: [s for s, n in fp["records"].items() if n] for name, fp in fingerprints.items()}
    for name, splits in (extra or {}).items():
        if name in used:
            used[name] += [s for s in splits if s not in used[name]]
    return used


class DatasetInputs(L.Callback):
    """At the end of a stage's training, its datasets as inputs of the stage's run (rank 0; nothing without a
    run). ``evaluated``: datasets whose ``evaluated_split`` the stage's own evaluation reads afterwards in the same
    run (that context is logged now: MLflow keeps this first input of the dataset in the run)."""

    def __init__(
        self, *, tracker: Any, run_id: str | None, evaluated: list[str] | None = None, evaluated_split: str = "test"
    ) -> None:
        self.tracker, self.run_id = tracker, run_id
        self.evaluated, self.evaluated_split = list(evaluated or []), evaluated_split

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.run_id is None or not getattr(self.tracker, "enabled", False):
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            return
        fingerprints = dataset_fingerprints(datamodule)
        contexts = used_splits(fingerprints, {name: [self.evaluated_split] for name in self.evaluated})
        self.tracker.log_datasets(self.run_id, dataset_inputs(fingerprints, contexts))
