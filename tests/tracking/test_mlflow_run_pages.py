"""What MLflow holds for a run, as its pages show it (issue 17, item 5; the browser test is
tests/e2e/test_mlflow_browser.py): the experiment's kind and artifact folder, few metrics with one name per
definition, counts as params, the final metrics on the experiment run, datasets as inputs, version tags, the
recipe's params, a registered model version with a description that loads as an MLflow pyfunc model, and the
LLM-MoE routing heatmap."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CANONICAL = {"eval/closed_accuracy", "eval/open_recall", "eval/bleu1"}  # what notebooks/01 reads


def runs_of(cfg) -> tuple[dict, object, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    return runs, experiment, client


def test_experiment_is_model_training_with_artifacts_beside_the_database(tiny_demo_run) -> None:
    from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, sqlite_path

    cfg, result, _, tmp = tiny_demo_run
    runs, experiment, _ = runs_of(cfg)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    folder = sqlite_path(cfg.mlflow.tracking_uri).resolve().parent / "mlartifacts"
    assert Path(experiment.artifact_location) == folder / cfg.mlflow.experiment_name
    for run in runs.values():  # never ./mlruns of the directory pytest ran from
        assert Path(run.info.artifact_uri).is_relative_to(folder), run.info.artifact_uri
        assert not Path(run.info.artifact_uri).is_relative_to(Path.cwd())
    assert (Path(runs["demo"].info.artifact_uri) / "config.yaml").is_file()
    assert Path(tmp).resolve() == folder.parent


def test_an_existing_experiment_gets_the_kind_and_the_runs_page_link(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(tracking_uri=uri, experiment_name="older")
    old = MlflowClient(tracking_uri=uri).create_experiment("older")  # made before medpipe set the kind
    assert tracker._experiment() == old
    assert MlflowClient(tracking_uri=uri).get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    page = tracker.runs_page()
    assert page.startswith(f"http://127.0.0.1:5000/#/experiments/{old}/runs?workflowType=machine_learning")
    assert f"mlflow ui --backend-store-uri {uri}" in page


def test_stage_runs_log_one_name_per_metric_and_counts_as_params(tiny_demo_run) -> None:
    cfg, result, _, _ = tiny_demo_run
    runs, _, _ = runs_of(cfg)
    for stage in result.stages:
        run = runs[stage.name]
        names = set(run.data.metrics)
        assert len(names) <= 30, sorted(names)  # 103 before: every protocol's every score, counts, test/ copies
        assert CANONICAL <= names
        # closed accuracy: the headline, each released script's rule once (MedPLIB's is the headline's), baseline
        assert {n for n in names if "closed_accuracy" in n} == {
            "eval/closed_accuracy",
            "eval/closed_accuracy_llava_med",
            "eval/closed_accuracy_llava_med_ad758b6",
            "eval/closed_accuracy_med_moe",
            "eval/closed_accuracy_uni_med",
            "baseline/closed_accuracy",
        }
        # "bleu1": one meaning per name
        assert {n for n in names if "bleu1" in n} == {
            "eval/bleu1",
            "eval/open_bleu1_llava_med",
            "eval/open_bleu1_med_moe",
            "baseline/bleu1",
        }
        assert not [n for n in names if n.startswith(("test/", "eval/protocol/", "eval/text/"))]
        assert not [n for n in names if n.startswith("eval/") and (n.endswith("count") or "/n_" in n)]
        ev = stage.evaluation
        assert run.data.metrics["eval/closed_accuracy"] == pytest.approx(ev.metrics["closed_accuracy"])
        assert run.data.metrics["eval/closed_accuracy_med_moe"] == pytest.approx(
            ev.metrics["protocol/med_moe/closed_accuracy"]
        )
        assert run.data.metrics["eval/open_bleu1_llava_med"] == pytest.approx(
            ev.metrics["protocol/llava_med/open_bleu1_individual"]
        )
        params = run.data.params
        assert int(params["eval.n_expected"]) == ev.n_expected and int(params["eval.n_scored"]) == ev.count
        assert int(params["eval.closed_count"]) + int(params["eval.open_count"]) == ev.count
        assert params["eval.split"] == ev.split == "test"
    metrics_json = json.loads((Path(cfg.output_dir) / "stages" / "instruct" / "eval" / "metrics.json").read_text())
    assert "protocol/uni_med/all_bleu4_cumulative" in metrics_json["all_metrics"]  # the full table stays there


def test_experiment_run_carries_the_final_metrics(tiny_demo_run) -> None:
    cfg, result, _, _ = tiny_demo_run
    runs, _, _ = runs_of(cfg)
    parent, last = runs["demo"], runs[result.stages[-1].name]
    assert CANONICAL <= set(parent.data.metrics)
    assert parent.data.metrics["eval/closed_accuracy"] == pytest.approx(result.evaluation.metrics["closed_accuracy"])
    assert parent.data.metrics["eval/open_recall"] == pytest.approx(result.evaluation.metrics["open_recall"])
    assert parent.data.metrics["baseline/closed_accuracy"] == pytest.approx(
        result.evaluation.baseline["closed_accuracy"]
    )
    assert {k: v for k, v in last.data.metrics.items() if k.startswith(("eval/", "baseline/"))} == pytest.approx(
        parent.data.metrics
    )
    assert parent.data.tags["evaluation.split"] == "test"


def test_datasets_are_run_inputs_with_their_fingerprints(tiny_demo_run) -> None:
    cfg, result, _, _ = tiny_demo_run
    runs, _, _ = runs_of(cfg)

    def inputs(run) -> dict[str, tuple[str, str]]:
        return {
            i.dataset.name: (i.dataset.digest, next(t.value for t in i.tags if t.key == "mlflow.data.context"))
            for i in run.inputs.dataset_inputs
        }

    align, instruct = runs["align"], runs["instruct"]
    # align trains on the captions (train + val) and is evaluated on SLAKE's test split in its run
    assert inputs(align) == {
        "phantom_captions": (align.data.params["data.phantom_captions.sha256"], "train+val"),
        "phantom_slake": (instruct.data.params["data.phantom_slake.sha256"], "test"),
    }
    assert inputs(instruct) == {"phantom_slake": (instruct.data.params["data.phantom_slake.sha256"], "train+val+test")}
    source = json.loads(instruct.inputs.dataset_inputs[0].dataset.source)
    assert source["uri"] == cfg.data.datasets.phantom_slake.path
    assert inputs(runs["demo"]) == {
        "phantom_captions": (align.data.params["data.phantom_captions.sha256"], "train+val"),
        "phantom_slake": (instruct.data.params["data.phantom_slake.sha256"], "train+val+test"),
    }


def test_version_tags_record_medpipe_and_the_working_directory(tiny_demo_run, tmp_path: Path) -> None:
    from pipeline.tracking import version_tags

    cfg, _, _, _ = tiny_demo_run
    runs, _, _ = runs_of(cfg)
    tags = runs["demo"].data.tags
    from importlib.metadata import version

    assert tags["medpipe.version"] == version("medpipe")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode == 0:  # medpipe runs from this checkout (an editable install)
        assert tags["medpipe.commit"] == head.stdout.strip() and tags["medpipe.dirty"] in ("true", "false")
    # outside any checkout: medpipe's own commit still, no working-directory commit
    outside = version_tags(cwd=tmp_path)
    assert not any(k.startswith("cwd.") for k in outside)
    assert outside.get("medpipe.commit") == tags.get("medpipe.commit")
    # a working directory that is a checkout of its own
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(tmp_path),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    inside = version_tags(cwd=tmp_path)
    assert len(inside["cwd.git_commit"]) == 40 and inside["cwd.git_commit"] != inside.get("medpipe.commit")
    assert inside["cwd.git_dirty"] == "false"


def test_experiment_run_params_are_the_recipe(tiny_demo_run) -> None:
    from pipeline.tracking import flatten_config

    cfg, _, _, _ = tiny_demo_run
    runs, _, client = runs_of(cfg)
    parent = runs["demo"]
    params = parent.data.params
    assert len(params) < 60 < len(flatten_config(cfg))  # 180 before: every default of the schema
    assert params["stages.align.optim.lr"] == "0.002" and params["model.connector.aggregation"] == "avgpool"
    assert params["model.connector.type"] == "mlp" and params["model.llm.path"] == "tiny:llama"  # recipe keys
    assert params["stages.instruct.train"] == '["connector", "lora"]'
    assert "trainer.accelerator" not in params and "evaluation.max_new_tokens" not in params  # defaults
    config = Path(client.download_artifacts(parent.info.run_id, "config.yaml"))
    assert "accelerator: auto" in config.read_text()  # the full resolved config is the artifact


def test_registered_version_has_a_card_and_loads_as_a_pyfunc_model(tiny_demo_run, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from pipeline.runner import build_datamodule

    cfg, result, _, _ = tiny_demo_run
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    name, number = result.model_uri.removeprefix("models:/").split("/")
    version = client.get_model_version(name, number)
    assert "medpipe recipe `demo`, stages align -> instruct" in version.description
    assert f"closed accuracy {result.evaluation.metrics['closed_accuracy']:.3f}" in version.description
    assert version.tags["recipe"] == "demo" and version.tags["stages"] == "align,instruct"
    assert version.tags["medpipe.version"] and version.tags["source_run"] == result.parent_run_id

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(result.model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    schema = model.metadata.signature
    assert schema.inputs.input_names() == ["image", "question"] and schema.outputs.input_names() == ["answer"]
    # the same answers as medpipe's own evaluation of the last stage, on the same images and questions
    predictions = [json.loads(line) for line in result.evaluation.predictions_file.read_text().splitlines()]
    records = {r.id: r for r in build_datamodule(cfg, ["phantom_slake"]).split_records("test")}
    rows = predictions[:8]
    frame = pd.DataFrame(
        {
            "image": [records[p["question_id"]].image_path for p in rows],
            "question": [records[p["question_id"]].question for p in rows],
        }
    )
    assert list(model.predict(frame)) == [p["text"] for p in rows]
    # the same model as a PythonModel over the downloaded folder (MedpipeVQAModel's load_context)
    from pipeline.mlflow_model import MedpipeVQAModel
    from pipeline.registry import download_model

    folder = download_model(result.model_uri, tracking_uri=cfg.mlflow.tracking_uri, dst=tmp_path / "download")
    mlflow.pyfunc.save_model(
        tmp_path / "python_model", python_model=MedpipeVQAModel(), artifacts={"model": str(folder)}
    )
    again = mlflow.pyfunc.load_model(str(tmp_path / "python_model"))
    assert list(again.predict(frame)) == [p["text"] for p in rows]
    with pytest.raises(Exception, match="question"):  # the signature names the columns
        model.predict(pd.DataFrame({"image": [frame["image"][0]]}))


def test_expert_load_shares_per_layer() -> None:
    import numpy as np

    from pipeline.plots import expert_load_heatmap, expert_load_shares

    summary = {
        "modalities": ["CT", "MRI"],
        "layers": {
            "layer0": {"experts": 2, "top_k": 1, "by_modality": {"CT": [3, 1], "MRI": [0, 4]}},
            "layer1": {"experts": 2, "top_k": 1, "by_modality": {}},
        },
    }
    layers, shares = expert_load_shares(summary)
    assert layers == ["layer0", "layer1"]
    np.testing.assert_allclose(shares[0], [3 / 8, 5 / 8])
    assert np.isnan(shares[1]).all()  # no assignments recorded
    expert_load_heatmap(summary, title="t")


@pytest.mark.slow
def test_moe_stage_logs_the_routing_heatmap(tiny_med_moe_run) -> None:
    from PIL import Image

    cfg, result, _, _ = tiny_med_moe_run
    runs, _, client = runs_of(cfg)
    stage3 = runs["stage3"]
    assert "plots/moe_expert_load.png" in {a.path for a in client.list_artifacts(stage3.info.run_id, "plots")}
    image = Path(cfg.output_dir) / "stages" / "stage3" / "moe_expert_load.png"
    assert Image.open(image).size[0] > 200
    summary = json.loads((Path(cfg.output_dir) / "stages" / "stage3" / "expert_load.json").read_text())
    assert summary["layers"]  # the heatmap's rows
    for name in ("stage1", "stage2", "router"):  # dense stages: no heatmap
        assert "plots/moe_expert_load.png" not in {
            a.path for a in client.list_artifacts(runs[name].info.run_id, "plots")
        }
