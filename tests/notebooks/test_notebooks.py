"""Every analysis notebook executes against runs made by tiny experiments (parameters injected).

Each notebook ends with a cell tagged ``result`` whose output is one JSON object (``application/json``)
holding every number the notebook shows. The tests read that object and recompute each value on their own
from MLflow (``MlflowClient``: metrics, metric histories, artifacts) and from the runs' result objects,
then compare value by value: exactly where the notebook copies a number, to 1e-9 where it derives one
(means, medians, shares). Metric names come from the parameters the tests pass to the notebooks.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
DERIVED_TOL = 1e-9

# the metric names the notebooks are given (the eval/<name> metrics are the evaluation's headline numbers)
COMPARE_METRICS = ["eval/closed_accuracy", "eval/open_recall"]
BASELINE_PREFIX = "baseline/"
LOSS = "train/loss"
GROUNDING_METRICS = {"mDice": "eval/seg/mdice", "mIoU": "eval/seg/miou", "MONAI Dice": "eval/seg/monai_dice"}


def execute(name: str, parameters: dict) -> list:
    """Run the notebook with ``parameters`` set in a cell right after its ``parameters`` cell (papermill's
    way: defaults not given stay); returns the executed cells."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return nb.cells


def result_of(cells: list) -> dict:
    """The JSON object shown by the notebook's ``result`` cell (its last cell)."""
    assert "result" in cells[-1].metadata.get("tags", []), "the last cell is tagged 'result'"
    shown = [o["data"]["application/json"] for o in cells[-1].outputs if "application/json" in o.get("data", {})]
    assert len(shown) == 1, cells[-1].outputs
    return shown[0]


def images(cells: list) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for c in cells
        for out in c.get("outputs", [])
        if out.get("output_type") == "display_data"
    )


def assert_same(
    actual: Any, expected: Any, derived: frozenset[str] = frozenset(), where: str = "result", key: str = ""
) -> None:
    """``actual`` (from the notebook's JSON) equals ``expected`` (recomputed here): dicts key for key, lists
    item for item; numbers under a key in ``derived`` to within 1e-9, every other value exactly (type too)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], derived, f"{where}[{k!r}]", k)
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list), f"{where}: {actual!r} is not a list"
        assert len(actual) == len(expected), f"{where}: {len(actual)} items != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, derived, f"{where}[{i}]", key)
    elif isinstance(expected, float) and key in derived:
        assert isinstance(actual, int | float) and math.isclose(actual, expected, rel_tol=0, abs_tol=DERIVED_TOL), (
            f"{where}: {actual!r} != {expected!r} (to {DERIVED_TOL})"
        )
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"


def filled(rows: list[dict]) -> list[dict]:
    """Rows of a table as the notebook's DataFrame gives them: every column in every row (None where empty)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return [{c: row.get(c) for c in columns} for row in rows]


def ordered(values: list) -> list:
    return sorted(values, key=lambda m: (m.step, m.timestamp))


def download(client, run_id: str, path: str) -> Path:
    return Path(client.download_artifacts(run_id, path, tempfile.mkdtemp()))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs_with(client, experiment: str, prefix: str) -> list:
    """The runs of ``experiment`` logging a metric that starts with ``prefix``, oldest first."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=5000)
    return sorted(
        (r for r in runs if any(k.startswith(prefix) for k in r.data.metrics)),
        key=lambda r: (r.info.start_time, r.info.run_id),
    )


def run_label(client, run) -> str:
    parent = run.data.tags.get("mlflow.parentRunId")
    return f"{client.get_run(parent).info.run_name if parent else '?'}/{run.info.run_name}"


def test_notebooks_are_stored_without_outputs() -> None:
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        tags = [t for c in nb.cells for t in c.metadata.get("tags", [])]
        assert tags.count("parameters") == 1 and tags.count("result") == 1, path.name
        assert "result" in nb.cells[-1].metadata.get("tags", []), f"{path.name}: the result cell comes last"


@pytest.mark.slow
def test_01_compare_runs(tiny_demo_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, _, _ = tiny_demo_run
    uri, experiment = cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name
    cells = execute(
        "01_compare_runs.ipynb",
        {
            "TRACKING_URI": uri,
            "EXPERIMENTS": [experiment],
            "METRICS": COMPARE_METRICS,
            "BASELINE_PREFIX": BASELINE_PREFIX,
            "LOSS": LOSS,
        },
    )
    out = result_of(cells)

    # what MLflow holds now (other tests may have added evaluation runs to the same store): top-level runs,
    # and the stage runs of each found through MLflow's search by parent tag
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    every_run = client.search_runs([experiment_id], max_results=5000)
    top = {r.info.run_id: r for r in every_run if "mlflow.parentRunId" not in r.data.tags}
    assert_same(
        sorted(out["experiment runs"], key=lambda r: r["run id"]),
        [{"run id": i, "name": r.info.run_name, "recipe": r.data.tags.get("recipe")} for i, r in sorted(top.items())],
    )
    assert out["stage runs"] == len(every_run) - len(top)
    children = {
        run.info.run_id: (parent, run)
        for parent in top.values()
        for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    }
    expected = {
        run_id: {
            "experiment run": parent.info.run_name,
            "recipe": parent.data.tags.get("recipe"),
            "stage": run.info.run_name,
            "status": run.info.status,
            **{metric: run.data.metrics.get(metric) for metric in COMPARE_METRICS},
            **{
                "baseline " + metric.split("/")[-1]: run.data.metrics.get(BASELINE_PREFIX + metric.split("/")[-1])
                for metric in COMPARE_METRICS
            },
            "run id": run_id,
        }
        for run_id, (parent, run) in children.items()
    }
    table = {row["run id"]: row for row in out["table"]}
    assert len(table) == len(out["table"]) == len(expected)  # one row per stage run, no other
    assert_same(table, expected)
    starts = [children[row["run id"]][1].info.start_time for row in out["table"]]
    assert starts == sorted(starts)  # oldest first

    # the demo's stages, as the run returned them: the same numbers the table shows, every cell filled
    assert [s.name for s in result.stages] == ["align", "instruct"]
    for stage in result.stages:
        row = table[stage.run_id]
        assert row["stage"] == stage.name and row["experiment run"] == top[result.parent_run_id].info.run_name
        for metric in COMPARE_METRICS:
            name = metric.split("/", 1)[1]
            assert row[metric] == stage.evaluation.metrics[name], metric
            assert row["baseline " + name] == stage.evaluation.baseline[name], metric
    # the chart draws the rows with the first metric
    assert out["chart"] == [row["run id"] for row in out["table"] if row[COMPARE_METRICS[0]] is not None]
    assert {s.run_id for s in result.stages} <= set(out["chart"])

    # learning curves: the loss history of every stage run that has one
    curves = []
    for row in out["table"]:
        history = ordered(client.get_metric_history(row["run id"], LOSS))
        if history:
            curves.append(
                {
                    "run": f"{row['experiment run']}/{row['stage']}",
                    "points": len(history),
                    "first step": history[0].step,
                    "last step": history[-1].step,
                    "first": history[0].value,
                    "last": history[-1].value,
                    "min": min(m.value for m in history),
                    "run id": row["run id"],
                }
            )
    assert_same(out["curves"], curves)
    assert {s.run_id for s in result.stages} <= {c["run id"] for c in out["curves"]}
    assert images(cells) == 2  # the bar chart and the learning curves


@pytest.mark.slow
def test_02_expert_routing(tiny_med_moe_run, tiny_cmoe_run) -> None:
    """Per-task (CMoE), per-modality (LLM MoE) routing and expert load over time, all numbers from MLflow;
    a missing connector-MoE experiment is skipped with a note."""
    from mlflow.tracking import MlflowClient

    cfg, result, _, _ = tiny_med_moe_run
    cmoe_cfg, cmoe_result = tiny_cmoe_run
    uri = cfg.mlflow.tracking_uri
    experiment, cmoe_experiment = cfg.mlflow.experiment_name, cmoe_cfg.mlflow.experiment_name
    cells = execute(
        "02_expert_routing.ipynb", {"TRACKING_URI": uri, "EXPERIMENT": experiment, "CMOE_EXPERIMENT": cmoe_experiment}
    )
    out = result_of(cells)
    client = MlflowClient(tracking_uri=uri)
    assert out["skipped"] == []

    # which runs: those logging routing/ (connector MoE) and moe/ (LLM MoE) metrics, the tiny runs' among them
    cmoe_runs, moe_runs = runs_with(client, cmoe_experiment, "routing/"), runs_with(client, experiment, "moe/")
    assert_same(out["connector moe runs"], [{"run": run_label(client, r), "run id": r.info.run_id} for r in cmoe_runs])
    assert_same(out["llm moe runs"], [{"run": run_label(client, r), "run id": r.info.run_id} for r in moe_runs])
    stage3 = next(s.run_id for s in result.stages if s.name == "stage3")
    assert stage3 in [r.info.run_id for r in moe_runs]
    assert cmoe_result.stages[-1].run_id in [r.info.run_id for r in cmoe_runs]

    # routing per task: routing/<task>/expert_<e>, the last value logged; the heatmap the run logged
    routing = []
    for run in cmoe_runs:
        cells_by_task: dict[str, dict[str, float]] = {}
        for key, value in client.get_run(run.info.run_id).data.metrics.items():
            if m := re.fullmatch(r"routing/([^/]+)/expert_(\d+)", key):
                cells_by_task.setdefault(m[1], {})[f"expert {int(m[2])}"] = value
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        routing.append(
            {
                "run": run_label(client, run),
                "run id": run.info.run_id,
                "table": filled([{"task": t, **dict(sorted(cells_by_task[t].items()))} for t in sorted(cells_by_task)]),
                "logged heatmap": sha256(download(client, run.info.run_id, "plots/routing_heatmap.png"))
                if "plots/routing_heatmap.png" in artifacts
                else None,
            }
        )
    assert_same(out["routing"], routing)
    tiny_cmoe = next(r for r in routing if r["run id"] == cmoe_result.stages[-1].run_id)
    assert tiny_cmoe["logged heatmap"] is not None and len(tiny_cmoe["table"]) >= 2  # one row per task

    # routing per modality: moe/<layer>/<modality>/expert<e> (shares) and moe/expert_load.json (counts)
    modality = []
    for run in moe_runs:
        shares: dict[tuple[str, str], dict[str, float]] = {}
        for key, value in client.get_run(run.info.run_id).data.metrics.items():
            if m := re.fullmatch(r"moe/([^/]+)/(.+)/expert(\d+)", key):
                shares.setdefault((m[1], m[2]), {})[f"expert {int(m[3])}"] = value
        entry = {
            "run": run_label(client, run),
            "run id": run.info.run_id,
            "shares": filled(
                [{"layer": k[0], "modality": k[1], **dict(sorted(shares[k].items()))} for k in sorted(shares)]
            )
            or None,
            "counts": None,
        }
        if shares and "moe/expert_load.json" in {a.path for a in client.list_artifacts(run.info.run_id, "moe")}:
            summary = json.loads(download(client, run.info.run_id, "moe/expert_load.json").read_text())
            counts = [
                {"layer": layer, "modality": name, **{f"expert {e}": c for e, c in enumerate(row)}}
                for layer, load in summary["layers"].items()
                for name, row in load["by_modality"].items()
            ]
            entry["counts"] = counts
            entry["assignments"] = {
                layer: sum(sum(row) for row in load["by_modality"].values())
                for layer, load in summary["layers"].items()
            }
            entry["dropped"] = summary["dropped_total"]
        modality.append(entry)
    assert_same(out["modality"], modality)
    # the tiny stage 3: its artifact is the file the stage wrote, and the shares are its counts normalised
    tiny = next(m for m in out["modality"] if m["run id"] == stage3)
    on_disk = json.loads((Path(cfg.output_dir) / "stages" / "stage3" / "expert_load.json").read_text())
    assert tiny["dropped"] == on_disk["dropped_total"]
    assert tiny["assignments"] == {
        layer: sum(map(sum, load["by_modality"].values())) for layer, load in on_disk["layers"].items()
    }
    counts = {(c["layer"], c["modality"]): c for c in tiny["counts"]}
    assert tiny["shares"] and sorted(counts) == [(s["layer"], s["modality"]) for s in tiny["shares"]]
    for share in tiny["shares"]:
        count = counts[share["layer"], share["modality"]]
        experts = [k for k in count if k.startswith("expert ")]
        total = sum(count[k] for k in experts)
        for k in experts:
            assert share[k] == pytest.approx(count[k] / total, abs=1e-6), (share, count)

    # expert load over time: moe/<layer>/load_expert<e>, each series summarised; its last value is the latest
    load = []
    for run in moe_runs:
        metrics = client.get_run(run.info.run_id).data.metrics
        for key in sorted(k for k in metrics if re.fullmatch(r"moe/[^/]+/load_expert\d+", k)):
            history = ordered(client.get_metric_history(run.info.run_id, key))
            assert history[-1].value == metrics[key]
            load.append(
                {
                    "run": run_label(client, run),
                    "layer": key.split("/")[1],
                    "expert": key.split("/")[2],
                    "steps": len(history),
                    "first": history[0].value,
                    "last": history[-1].value,
                    "mean": statistics.fmean(m.value for m in history),
                }
            )
    assert_same(out["load over time"], load, derived=frozenset({"mean"}))
    assert any(row["run"].endswith("/stage3") and row["steps"] >= 2 for row in out["load over time"])

    # routing over time: every (task, expert) series of each connector-MoE run; its last value is the table's
    series = []
    for run, table in zip(cmoe_runs, routing, strict=True):
        for row in table["table"]:
            for expert in sorted(k for k in row if k.startswith("expert ")):
                history = ordered(
                    client.get_metric_history(run.info.run_id, f"routing/{row['task']}/expert_{expert.split()[1]}")
                )
                assert history[-1].value == row[expert]
                series.append(
                    {
                        "run": table["run"],
                        "task": row["task"],
                        "expert": f"expert_{expert.split()[1]}",
                        "validations": len(history),
                        "first": history[0].value,
                        "last": history[-1].value,
                    }
                )
    assert_same(out["routing over time"], series)
    # CMoE heatmap + its logged png, the modality heatmaps, the two over-time figures
    assert images(cells) >= 5

    # without the connector-MoE experiment: skipped with a note, the LLM MoE part unchanged
    cells = execute(
        "02_expert_routing.ipynb",
        {"TRACKING_URI": uri, "EXPERIMENT": experiment, "CMOE_EXPERIMENT": "no-such-experiment"},
    )
    alone = result_of(cells)
    assert alone["skipped"] == [f"no MLflow experiment 'no-such-experiment' at {uri}: skipped"]
    assert alone["connector moe runs"] == alone["routing"] == alone["routing over time"] == []
    for key in ("llm moe runs", "modality", "load over time"):
        assert_same(alone[key], out[key], derived=frozenset({"mean"}), where=key)


@pytest.mark.slow
def test_03_tug_of_war(tiny_conflict_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, _ = tiny_conflict_run
    uri, experiment, group = cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name, "connector"
    cells = execute("03_tug_of_war.ipynb", {"TRACKING_URI": uri, "EXPERIMENT": experiment, "GROUP": group})
    out = result_of(cells)
    client = MlflowClient(tracking_uri=uri)
    prefix = f"grad_conflict/{group}/"

    runs = runs_with(client, experiment, prefix)
    assert out["group"] == group
    assert_same(out["runs"], [{"run": run_label(client, r), "run id": r.info.run_id} for r in runs])
    # the two-task stage measured conflict, the alignment stage before it did not
    assert [r["run id"] for r in out["runs"]] == [result.stages[-1].run_id]

    pairs, summary, matrices = [], [], []
    for run in runs:
        label = run_label(client, run)
        keys = sorted(k for k in client.get_run(run.info.run_id).data.metrics if k.startswith(prefix) and ".vs." in k)
        for key in keys:
            history = ordered(client.get_metric_history(run.info.run_id, key))
            pairs.append(
                {
                    "run": label,
                    "pair": key.removeprefix(prefix).replace(".vs.", " vs "),
                    "measurements": len(history),
                    "first step": history[0].step,
                    "last step": history[-1].step,
                    "first": history[0].value,
                    "last": history[-1].value,
                    "min": min(m.value for m in history),
                    "negative": sum(m.value < 0 for m in history),
                }
            )
        for metric in ("mean_cos", "negative_share"):
            history = ordered(client.get_metric_history(run.info.run_id, prefix + metric))
            if history:
                summary.append(
                    {
                        "run": label,
                        "metric": metric,
                        "first": history[0].value,
                        "last": history[-1].value,
                        "mean": statistics.fmean(m.value for m in history),
                        "measurements": len(history),
                    }
                )
        logged = json.loads(download(client, run.info.run_id, "analysis/grad_conflict.json").read_text())
        last = logged[-1]["groups"][group]
        matrices.append({"run": label, "step": logged[-1]["step"], "tasks": last["tasks"], "cos": last["cos"]})
    assert_same(out["pairs"], pairs)
    assert_same(out["summary"], summary, derived=frozenset({"mean"}))
    assert_same(out["matrices"], matrices)

    # the instruct stage: captions against VQA, measured every 2 steps; the matrix logged at the end holds the
    # pair's last cosine, and mean_cos is the mean over the one pair
    assert [(p["pair"], p["measurements"]) for p in out["pairs"]] == [("caption vs vqa", len(logged))]
    (matrix,) = out["matrices"]
    assert matrix["tasks"] == ["caption", "vqa"]
    assert matrix["cos"][0][1] == pytest.approx(out["pairs"][0]["last"], abs=DERIVED_TOL)
    mean_cos = next(s for s in out["summary"] if s["metric"] == "mean_cos")
    assert (mean_cos["first"], mean_cos["last"]) == (out["pairs"][0]["first"], out["pairs"][0]["last"])
    assert {s["metric"] for s in out["summary"]} == {"mean_cos", "negative_share"}
    assert images(cells) == 2  # the cosine curves and the last matrix


@pytest.mark.slow
def test_04_grounding_gallery(tiny_grounding_run) -> None:
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    cfg, result, counts = tiny_grounding_run
    uri, experiment, max_images = cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name, 4
    cells = execute(
        "04_grounding_gallery.ipynb",
        {"TRACKING_URI": uri, "EXPERIMENT": experiment, "MAX_IMAGES": max_images, "METRICS": GROUNDING_METRICS},
    )
    out = result_of(cells)
    client = MlflowClient(tracking_uri=uri)
    headline = GROUNDING_METRICS["mDice"]

    # the evaluation runs: the headline metric and a predictions file of their own (the experiment run may repeat
    # the final evaluation's numbers, without the file); here the tiny run's one evaluation
    runs = [
        r
        for r in runs_with(client, experiment, headline)
        if headline in r.data.metrics
        and any(a.path == "evaluation/predictions.jsonl" for a in client.list_artifacts(r.info.run_id, "evaluation"))
    ]
    assert len(runs) == 1 and runs[0].data.tags["mlflow.parentRunId"] == result.parent_run_id
    table, ious, overlays = [], [], []
    for run in runs:
        label, metrics = run_label(client, run), client.get_run(run.info.run_id).data.metrics
        rows = [json.loads(line) for line in download(client, run.info.run_id, "evaluation/predictions.jsonl").open()]
        scored = [r for r in rows if r.get("iou") is not None]
        row = {
            "run": label,
            **{column: metrics.get(key) for column, key in GROUNDING_METRICS.items()},
            "images": len(scored),
            "no <SEG>": sum(r["seg_produced"] is False for r in scored),
        }
        row |= {f"mDice {k.rsplit('/', 1)[1]}": v for k, v in metrics.items() if k.startswith(headline + "/")}
        table.append(row | {"run id": run.info.run_id})
        iou = [float(r["iou"]) for r in scored]
        ious.append(
            {
                "run": label,
                "images scored": len(iou),
                "median IoU": statistics.median(iou),
                "IoU > 0.5": sum(i > 0.5 for i in iou) / len(iou),
                "histogram": [int(c) for c in np.histogram(iou, bins=np.linspace(0, 1, 21))[0]],
            }
        )
        for path in [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/overlays")][:max_images]:
            local = download(client, run.info.run_id, path)
            with Image.open(local) as image:
                shape = [image.height, image.width, len(image.getbands())]
            overlays.append({"run": label, "path": path, "shape": shape, "sha256": sha256(local)})
    assert_same(out["table"], filled(table))
    assert_same(out["iou"], ious, derived=frozenset({"median IoU", "IoU > 0.5"}))
    assert_same(out["overlays"], overlays)

    # the run's own results: the numbers logged are the evaluation's, every test image scored, and the
    # modality columns are the modalities of the predictions file the evaluation wrote
    (row,) = out["table"]
    evaluation = result.evaluation
    assert row["mDice"] == evaluation.metrics["seg/mdice"] and row["mIoU"] == evaluation.metrics["seg/miou"]
    written = [json.loads(line) for line in evaluation.predictions_file.open()]
    written = [r for r in written if r.get("iou") is not None]
    assert row["images"] == counts["test"] == len(written) == sum(out["iou"][0]["histogram"])
    by_modality: dict[str, list[float]] = {}
    for r in written:
        by_modality.setdefault(r["modality"], []).append(2 * r["iou"] / (1 + r["iou"]))
    assert {k for k in row if k.startswith("mDice ")} == {f"mDice {m}" for m in by_modality}
    for name, dice in by_modality.items():
        assert row[f"mDice {name}"] == pytest.approx(statistics.fmean(dice), abs=DERIVED_TOL)
    assert row["mIoU"] == pytest.approx(statistics.fmean(r["iou"] for r in written), abs=DERIVED_TOL)
    # MAX_IMAGES overlays shown, each the file the evaluation drew
    assert len(out["overlays"]) == max_images
    for overlay in out["overlays"]:
        assert overlay["sha256"] == sha256(evaluation.predictions_file.parent / "overlays" / Path(overlay["path"]).name)
    assert images(cells) == 2  # the histogram and the overlay gallery
