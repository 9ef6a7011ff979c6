"""Every analysis notebook executes against runs made by tiny experiments (parameters injected)."""

from __future__ import annotations

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
    cells = execute("01_compare_runs.ipynb", {"TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "EXPERIMENTS": ["e2e"],
                                              "METRICS": ["eval/closed_accuracy", "eval/open_recall"]})
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
    history = MlflowClient(tracking_uri=uri).get_metric_history(result.stages[-1].run_id,
                                                                 "grad_conflict/connector/mean_cos")
    assert f"{history[-1].value:.6f}"[:6] in text or f"{history[-1].value:.4f}"[:5] in text
    assert any(out.get("output_type") == "display_data" for c in cells for out in c.get("outputs", []))
