"""Issue 16, class 3: records skipped outside the training split are counted. Every split's skips reach the
stage's and the evaluation's MLflow runs (``data/<split>/skipped``, each skipped record in
``data/skipped_<split>.json``), and the evaluation reports ``n_expected`` / ``n_scored`` / ``n_skipped``
beside its metrics: metrics.json, MLflow (``eval.n_*`` params) and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import tiny_slake_experiment


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """A SLAKE folder with one bad record in the validation split and one in the test split, run under
    ``on_bad_record: skip``: (cfg, result, expected records per split, tmp)."""
    from datamodules.writers.slake import write_slake
    from pipeline.runner import run_experiment

    tmp = tmp_path_factory.mktemp("skips")
    slake = tmp / "slake"
    counts = write_slake(slake, n_train=4, n_val=2, n_test=3, seed=3)
    for name, spoil in (("validate.json", lambda r: r.pop("question")), ("test.json", lambda r: r.update(answer=""))):
        items = json.loads((slake / name).read_text())
        spoil(items[0])
        (slake / name).write_text(json.dumps(items))
    _, cfg = tiny_slake_experiment(tmp, slake, ["data.on_bad_record=skip"])
    return cfg, run_experiment(cfg), counts, tmp


def runs_by_name(cfg) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}, client


def test_metrics_json_reports_expected_scored_and_skipped(skipping_run) -> None:
    cfg, result, counts, _ = skipping_run
    metrics = json.loads((Path(cfg.output_dir) / "eval" / "metrics.json").read_text())
    n_test = counts["test"]
    assert (metrics["n_expected"], metrics["n_scored"], metrics["n_skipped"]) == (n_test, n_test - 1, 1)
    assert sum(metrics["skipped"].values()) == 1
    assert "count" not in metrics  # no bare count that reads as the whole split
    scored = metrics["n_scored_by_metric"]
    assert scored["closed_accuracy"] + scored["open_recall"] == scored["bleu1"] == n_test - 1
    ev = result.evaluation
    assert (ev.n_expected, ev.count, ev.n_skipped) == (n_test, n_test - 1, 1)
    report = (Path(cfg.output_dir) / "eval" / "report.md").read_text().splitlines()
    assert report[2].startswith(f"Split `test`: {n_test} records expected, {n_test - 1} scored, 1 skipped (")
    assert "data/skipped_test.json" in report[2]


def test_every_split_logs_its_skips_to_mlflow(skipping_run) -> None:
    cfg, _, counts, _ = skipping_run
    runs, client = runs_by_name(cfg)
    evaluation, params = runs["evaluate"].data.metrics, runs["evaluate"].data.params
    assert int(params["eval.n_expected"]) == counts["test"]  # counts are params, not metric charts
    assert int(params["eval.n_scored"]) == counts["test"] - 1
    assert int(params["eval.n_skipped"]) == 1
    assert not any(k.startswith("data/") for k in evaluation)  # skip counts are params too
    assert params["data.test.skipped"] == "1"
    assert sum(int(v) for k, v in params.items() if k.startswith("data.test.skipped_")) == 1
    assert params["data.train.skipped"] == "0"  # the majority baseline's split, read by the evaluation too
    stage = runs["train"].data.params
    assert (stage["data.train.skipped"], stage["data.val.skipped"], stage["data.skipped"]) == ("0", "1", "1")
    listed = client.download_artifacts(runs["evaluate"].info.run_id, "data/skipped_test.json")
    (problem,) = json.loads(Path(listed).read_text())
    assert problem["file"].endswith("test.json") and problem["field"] == "answer"
    listed = client.download_artifacts(runs["train"].info.run_id, "data/skipped_val.json")
    (problem,) = json.loads(Path(listed).read_text())
    assert problem["file"].endswith("validate.json") and problem["field"] == "question"
