"""Dataset and mixture keys in the experiment config: defaults, checks, and the DataModule they build."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def experiment(tmp_path: Path, datasets: str) -> Path:
    """An experiment YAML with ``datasets`` (YAML lines) under data.datasets."""
    body = "\n".join("    " + line for line in textwrap.dedent(datasets).splitlines())
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"defaults: [{REPO / 'experiments' / 'defaults.yaml'}]\nname: exp\n"
        f"output_dir: {tmp_path / 'out'}\ndata:\n  datasets:\n{body}\n"
        "stages:\n  s1: {train: [connector]}\n"
    )
    return path


def test_demo_config_is_unchanged_by_the_new_keys() -> None:
    cfg = load_config(REPO / "experiments" / "demo.yaml", check_paths=False)
    assert cfg.data.mixture.one_task_per_batch is False and cfg.data.mixture.samples_per_epoch is None
    assert cfg.data.verify_images is False
    assert cfg.data.datasets.phantom_slake.format == "slake" and cfg.data.datasets.phantom_slake.weight == 1.0


def test_mixture_keys_reach_the_datamodule(tmp_path: Path) -> None:
    from pipeline.runner import build_datamodule

    path = experiment(
        tmp_path,
        """\
        rad: {format: vqa_rad, path: /data/rad, val_split: null, weight: 2.0,
              synthetic: {layout: parquet, train_images: 2, test_images: 1}}
        meco: {format: mecovqa, path: /data/meco, val_split: null, subsets: [grounding]}
        """,
    )
    cfg = load_config(
        path,
        ["data.mixture.one_task_per_batch=true", "data.mixture.samples_per_epoch=64", "data.verify_images=true"],
        check_paths=False,
    )
    dm = build_datamodule(cfg)
    assert dm.one_task_per_batch is True and dm.samples_per_epoch == 64 and dm.verify_images is True
    assert dm.datasets["rad"].weight == 2.0 and dm.datasets["meco"].subsets == ["grounding"]


@pytest.mark.parametrize(
    "datasets, overrides, key",
    [
        ("rad: {format: vqa_rad, path: /x}", [], "data.datasets.rad.val_split"),  # VQA-RAD has no validation split
        (
            "meco: {format: mecovqa, path: /x, val_split: null, test_split: validation}",
            [],
            "data.datasets.meco.test_split",
        ),
        ("s: {format: slake, path: /x, task: segment}", [], "data.datasets.s.task"),
        ("s: {format: slake, path: /x, synthetic: {layout: parquet}}", [], "data.datasets.s.synthetic.layout"),
        ("m: {format: mecovqa, path: /x, val_split: null, subsets: [caption]}", [], "data.datasets.m.subsets"),
        ("s: {format: slake, path: /x}", ["data.mixture.samples_per_epoch=0"], "data.mixture.samples_per_epoch"),
        ("s: {format: slake, path: /x}", ["data.mixture.sizes=1"], "data.mixture.sizes"),
    ],
)
def test_bad_dataset_keys_are_config_errors(tmp_path: Path, datasets: str, overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(experiment(tmp_path, datasets), overrides, check_paths=False)
    assert f"'{key}'" in str(info.value), str(info.value)
