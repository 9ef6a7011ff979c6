"""``medpipe evaluate`` without ``ckpt`` on each imported layout that ``test_llava_import.py`` does not cover:
a tiny MoE-LLaVA / Med-MoE, MedPLIB and Uni-Med checkpoint (written by the importer tests' writers) is evaluated as
released, into its own ``evaluations/<time>-init-<format>`` folder, with a ``metrics.json`` whose provenance names
the imported checkpoint, and an MLflow evaluation run tagged with it. A handful of records each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _slake_sizes(name: str) -> list[str]:
    return [
        f"data.datasets.{name}.synthetic.train_images=2",
        f"data.datasets.{name}.synthetic.val_images=0",
        f"data.datasets.{name}.synthetic.test_images=2",
    ]


def _moe_llava(tmp: Path, clip: Path, llm: Path, cache: Path) -> tuple[Path, Path, list[str]]:
    from test_moe_llava_import import write_moe_llava

    folder = write_moe_llava(tmp, clip, llm, kind="llama", layers=[0, 1])  # Med-MoE: meta expert, top-1
    overrides = [
        "model.connector.type=mlp",
        "model.connector.aggregation=none",
        "model.vision.select_layer=-2",
        "model.vision.pad_square=true",
        f"model.vision.path={clip}",
        f"model.llm.path={folder}",
        *_slake_sizes("phantom_slake"),
        "evaluation.max_new_tokens=3",
    ]
    return REPO / "experiments" / "demo.yaml", folder, overrides


def _medplib(tmp: Path, clip: Path, llm: Path, cache: Path) -> tuple[Path, Path, list[str]]:
    from test_medplib_import import write_medplib

    from pipeline.zoo import ensure_tiny

    folder = write_medplib(tmp, clip, llm, ensure_tiny("medsam", cache), layers=[0, 1])
    sizes = [
        f"data.datasets.{name}.synthetic.{field}={value}"
        for name in ("mecovqa_complex", "mecovqa_region", "mecovqa_grounding")
        for field, value in (("train_images", 2), ("test_images", 2))
    ]
    overrides = [
        f"model.vision.path={clip}",
        "model.vision.pad_square=true",
        "model.connector.aggregation=none",
        f"model.llm.path={folder}",
        "model.grounding.sam_path=tiny:medsam",
        "model.grounding.sam_format=hf",
        "model.grounding.sam_allow_missing_adapters=true",  # the released folder has SAM-Med2D's adapters only
        *sizes,
        "evaluation.datasets=[mecovqa_grounding]",  # <SEG> answers: the mask decoder runs too
        "evaluation.max_new_tokens=3",
        "evaluation.batch_size=4",
    ]
    return REPO / "experiments" / "medplib" / "tiny.yaml", folder, overrides


def _uni_med(tmp: Path, clip: Path, llm: Path, cache: Path) -> tuple[Path, Path, list[str]]:
    from test_uni_med_import import write_uni_med
    from transformers import CLIPVisionConfig

    checkpoint = write_uni_med(tmp, clip, llm)
    overrides = [
        f"model.vision.path={clip}",
        "model.vision.output_norm=true",
        f"model.llm.path={llm}",
        f"model.connector.task_embed_dim={4 * CLIPVisionConfig.from_pretrained(clip).hidden_size}",
        *[size for name in ("vqa", "refer", "identify") for size in _slake_sizes(name)],
        "evaluation.datasets=[vqa]",
        "evaluation.max_new_tokens=3",
        "evaluation.batch_size=4",
    ]
    return REPO / "experiments" / "uni_med" / "tiny.yaml", checkpoint, overrides


WRITERS = {"moe_llava": _moe_llava, "medplib": _medplib, "uni_med": _uni_med}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_medpipe_evaluate_runs_on_the_imported_checkpoint(
    tmp_path, tiny_clip, tiny_llama, cache_dir, capsys, layout
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main
    from pipeline.config import load_config

    config, path, overrides = WRITERS[layout](tmp_path, tiny_clip, tiny_llama, cache_dir)
    common = [
        f"output_dir={tmp_path}/out",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "mlflow.system_metrics=false",
        f"model.init={{format: {layout}, path: {path}}}",
    ]
    code = main(["evaluate", str(config), *common, *overrides])
    out = capsys.readouterr()
    assert code == 0, out.err
    (evaluation,) = (tmp_path / "out" / "evaluations").iterdir()  # its own folder, never eval/
    assert evaluation.name.endswith(f"-init-{layout}")
    assert not (tmp_path / "out" / "eval").exists()
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["n_scored"] == metrics["n_expected"] > 0
    provenance = metrics["provenance"]
    assert provenance["weights"]["model_init"] == {"format": layout, "path": str(path)}
    cfg = load_config(config, [*common, *overrides], check_paths=False)
    assert provenance["split"] == cfg.evaluation.split  # which split gave the numbers
    assert set(provenance["datasets"]) == set(cfg.evaluation.datasets)  # and which sets, as released
    assert provenance["protocols"]  # the released script each protocol follows
    if layout == "medplib":  # the grounding set: masks decoded and scored (mDice / mIoU)
        assert any(key.startswith("seg/") for key in metrics["all_metrics"]), sorted(metrics["all_metrics"])
    experiment = cfg.mlflow.experiment_name
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], filter_string="tags.stage = 'evaluate'"
    )
    assert [r.data.tags["checkpoint"] for r in runs] == [f"model.init {layout}:{path}"]
