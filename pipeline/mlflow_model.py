"""A registered medpipe model as an MLflow pyfunc model: ``mlflow.pyfunc.load_model("models:/medpipe-demo/1")``.

A registered version is the experiment run's ``model/`` folder (``pipeline.tracking.Tracker.register_model``):

    MLmodel, python_env.yaml, requirements.txt, conda.yaml   the python_function flavour, loader_module
                                                             pipeline.mlflow_model, with its signature
    config.yaml                                              the run's resolved config
    handover.json, previous/...                              the hand-over chain (pipeline/handover.py)

``mlflow.pyfunc.load_model`` downloads the folder and calls :func:`_load_pyfunc` on it, which rebuilds the model as
``pipeline.registry.load_registered`` does (the config, the base checkpoints it names, the hand-over chain) with
the last stage's conversation preset, the prompts the final evaluation used. ``predict`` takes a DataFrame with
columns ``image`` (a path) and ``question`` and returns one answer per row, generated as medpipe's evaluation
generates them (same prompt encoding, image transform, decoding settings, batch size and ``trainer.num_threads``;
the same answers where the process runs the same CPU kernels: ``trainer.cpu_kernels: portable`` takes effect only
when torch has not run a tensor operation yet, see pipeline/reproducibility.py).

:class:`MedpipeVQAModel` is the same model as an ``mlflow.pyfunc.PythonModel`` (its ``load_context`` reads the
folder from ``context.artifacts["model"]``), for ``mlflow.pyfunc.save_model(python_model=..., artifacts=...)``.

Not a ``transformers`` flavour: the model is medpipe's composition (vision tower, connector, LLM with LoRA merged
and, for MoE recipes, MoE layers and routers), which no transformers class holds; its weights are hand-over deltas
over base checkpoints. ``medpipe export --format hf`` writes a dense model as transformers'
``LlavaForConditionalGeneration``, which ``mlflow.transformers`` can log.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

INPUT_COLUMNS = ("image", "question")
OUTPUT_COLUMN = "answer"
REQUIREMENTS = ("medpipe", "torch", "transformers", "lightning", "peft", "mlflow", "pandas")


def signature() -> Any:
    """Inputs: ``image`` (path of an image file) and ``question`` (text); output: ``answer`` (text)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", name) for name in INPUT_COLUMNS]),
        outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]),
    )


def pip_requirements() -> list[str]:
    """The installed versions of what loading needs (medpipe itself comes from its checkout or wheel)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in REQUIREMENTS:
        try:
            found.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            found.append(name)
    return found


def write_pyfunc_files(folder: Path, *, metadata: dict[str, str] | None = None) -> Path:
    """The flavour files of a registered model (``MLmodel`` with the signature, the environment files) written
    into ``folder`` (created; it must not exist); the config and hand-over files are logged beside them."""
    with warnings.catch_warnings():  # an input example would need an image file: the signature says the columns
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        mlflow.pyfunc.save_model(
            path=str(folder),
            loader_module=__name__,
            signature=signature(),
            pip_requirements=pip_requirements(),
            metadata=metadata or None,
        )
    return folder


class VQAPredictor:
    """Answers (image, question) rows with a registered model, as medpipe's evaluation generates answers."""

    def __init__(self, folder: str | Path) -> None:
        from pipeline.registry import load_folder
        from pipeline.reproducibility import use_portable_cpu_kernels
        from pipeline.runner import build_datamodule, connect
        from pipeline.stages import evaluation_module

        self.cfg, self.built = load_folder(Path(folder))
        if self.cfg.trainer.cpu_kernels == "portable":  # the evaluation's kernels, where torch has not chosen yet
            use_portable_cpu_kernels()
        self.module = evaluation_module(self.cfg, self.built)
        self.module.eval()
        # the evaluation's encoder, transform and prompt settings; no dataset is read
        self.datamodule = connect(build_datamodule(self.cfg), self.built)

    def records(self, model_input: Any) -> list[Any]:
        from datamodules.records import Record

        frame = _frame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"model input needs columns {list(INPUT_COLUMNS)}; missing {missing}")
        return [
            Record(
                id=f"row-{i}",
                dataset="pyfunc",
                split="test",
                question=str(question),
                answer="",
                answer_type="open",
                image_path=str(image),
            )
            for i, (image, question) in enumerate(zip(frame["image"], frame["question"], strict=True))
        ]

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import torch
        from torch.utils.data import DataLoader

        from datamodules.dataset import VQADataset

        dm = self.datamodule
        dataset = VQADataset(
            self.records(model_input),
            encoder=dm.encoder,
            transform=dm.transform,
            with_answers=False,
            task_ids=dm.task_ids,
            prompts=dm.prompts,
            sam_transform=dm.sam_transform,
            region_grid_size=dm.region_grid_size,
        )
        loader = DataLoader(
            dataset, batch_size=self.cfg.evaluation.batch_size, shuffle=False, collate_fn=dm.collator(generation=True)
        )
        from pipeline.reproducibility import intra_op_threads

        answers: list[str] = []
        with torch.no_grad(), intra_op_threads(self.cfg.trainer.num_threads):
            for batch in loader:
                texts, _ = self.module.generate_answers(batch)
                answers += texts
        return answers


def _frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame({k: v if isinstance(v, list) else [v] for k, v in model_input.items()})
    return pd.DataFrame(model_input)


def _load_pyfunc(path: str) -> VQAPredictor:
    """MLflow's entry point for the python_function flavour (``loader_module``): ``path`` is the model folder."""
    return VQAPredictor(path)


class MedpipeVQAModel(mlflow.pyfunc.PythonModel):
    """The registered model as a ``PythonModel``: ``artifacts={"model": <registered model folder>}``; ``predict``
    takes the DataFrame as it is (a ``pd.DataFrame`` type hint: MLflow converts nothing)."""

    def load_context(self, context: Any) -> None:
        self.predictor = VQAPredictor(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> list[str]:
        return self.predictor.predict(model_input, params)
