"""Every analysis notebook executes against runs made by tiny experiments (parameters injected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"


def execute(name: str, parameters: dict) -> list:
    """Run the notebook with its ``parameters`` cell replaced; returns the executed cells."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return nb.cells


def outputs_text(cells: list) -> str:
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_notebooks_are_stored_without_outputs() -> None:
    import nbformat

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.slow
def test_01_compare_runs(tiny_demo_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, _, tmp = tiny_demo_run
    # other tests may add evaluation runs to the same store: count what MLflow holds now
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    parents = sum("mlflow.parentRunId" not in r.data.tags for r in runs)
    assert parents >= 1 and len(runs) - parents >= 2
    cells = execute(
        "01_compare_runs.ipynb",
        {
            "TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            "EXPERIMENTS": ["e2e"],
            "METRICS": ["eval/closed_accuracy", "eval/open_recall"],
        },
    )
    text = outputs_text(cells)
    assert f"{parents} experiment runs, {len(runs) - parents} stage runs" in text
    assert "instruct" in text and "align" in text
    # the table shows the numbers MLflow holds for the instruct stage
    value = result.stages[-1].evaluation.metrics["closed_accuracy"]
    assert f"{value:.6f}"[:5] in text


@pytest.mark.slow
def test_03_tug_of_war(tiny_conflict_run) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, tmp = tiny_conflict_run
    uri = f"sqlite:///{tmp}/mlflow.db"
    cells = execute("03_tug_of_war.ipynb", {"TRACKING_URI": uri, "EXPERIMENT": "conflict", "GROUP": "connector"})
    text = outputs_text(cells)
    assert "1 stage runs with gradient-conflict metrics for group 'connector'" in text
    # the summary table holds MLflow's numbers
    history = MlflowClient(tracking_uri=uri).get_metric_history(
        result.stages[-1].run_id, "grad_conflict/connector/mean_cos"
    )
    assert f"{history[-1].value:.6f}"[:6] in text or f"{history[-1].value:.4f}"[:5] in text
    assert any(out.get("output_type") == "display_data" for c in cells for out in c.get("outputs", []))


def _images(cells: list) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for c in cells
        for out in c.get("outputs", [])
        if out.get("output_type") == "display_data"
    )


@pytest.mark.slow
def test_02_expert_routing(tiny_med_moe_run, tiny_cmoe_run) -> None:
    """Per-task (CMoE), per-modality (LLM MoE) routing and expert load over time, all numbers from MLflow;
    a missing connector-MoE experiment is skipped with a note."""
    from mlflow.tracking import MlflowClient

    cfg, result, _, _ = tiny_med_moe_run
    cmoe_cfg, cmoe_result = tiny_cmoe_run
    uri = cfg.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=uri)
    stage3 = client.get_run(next(s.run_id for s in result.stages if s.name == "stage3")).data.metrics
    cmoe = client.get_run(cmoe_result.stages[-1].run_id).data.metrics
    per_modality = sorted(k for k in stage3 if k.count("/") == 3 and k.rsplit("/", 1)[1].startswith("expert"))
    per_task = sorted(k for k in cmoe if k.startswith("routing/") and k.endswith("/expert_0"))
    assert per_modality and per_task

    cells = execute(
        "02_expert_routing.ipynb",
        {
            "TRACKING_URI": uri,
            "EXPERIMENT": cfg.mlflow.experiment_name,
            "CMOE_EXPERIMENT": cmoe_cfg.mlflow.experiment_name,
        },
    )
    text = outputs_text(cells)
    assert "1 connector-MoE stage runs in 'uni-med-cmoe', 1 LLM-MoE stage runs in 'med-moe'" in text
    for key in per_modality + per_task:  # the tables hold MLflow's numbers
        assert f"{stage3.get(key, cmoe.get(key)):.4f}" in text, key
    layer0 = client.get_metric_history(
        next(s.run_id for s in result.stages if s.name == "stage3"), "moe/layer0/load_expert0"
    )
    assert f"{sorted(layer0, key=lambda m: m.step)[-1].value:.4f}" in text  # load over time: last step
    summary = json.loads((Path(cfg.output_dir) / "stages" / "stage3" / "expert_load.json").read_text())
    total = sum(map(sum, summary["layers"]["layer0"]["by_modality"].values()))
    assert f"layer0: {total} assignments" in text
    assert _images(cells) >= 5  # CMoE heatmap + its logged png, modality heatmaps, two over-time figures

    # without the connector-MoE experiment: skipped with a note, the LLM MoE part unchanged
    cells = execute(
        "02_expert_routing.ipynb",
        {"TRACKING_URI": uri, "EXPERIMENT": cfg.mlflow.experiment_name, "CMOE_EXPERIMENT": "no-such-experiment"},
    )
    text = outputs_text(cells)
    assert f"no MLflow experiment 'no-such-experiment' at {uri}: skipped" in text
    assert "no connector-MoE runs with routing/ metrics: nothing to show" in text
    assert f"{stage3[per_modality[0]]:.4f}" in text


@pytest.mark.slow
def test_04_grounding_gallery(tiny_grounding_run) -> None:
    cfg, result, counts = tiny_grounding_run
    cells = execute(
        "04_grounding_gallery.ipynb",
        {"TRACKING_URI": cfg.mlflow.tracking_uri, "EXPERIMENT": cfg.mlflow.experiment_name, "MAX_IMAGES": 4},
    )
    text = outputs_text(cells)
    assert "1 runs with grounding evaluations" in text
    metrics = result.evaluation.metrics
    assert f"{metrics['seg/mdice']:.6f}"[:5] in text  # the table shows MLflow's mDice
    assert f"{counts['test']} images scored" in text  # every test image has an IoU in predictions.jsonl
    images = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"]
    assert len(images) >= 2  # histogram + overlay gallery
