"""End to end: the demo config at tiny size, two stages, MLflow read back with MlflowClient."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from runs import full_state

from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"


def tiny_overrides(tmp: Path) -> list[str]:
    from runs import tiny_demo_overrides

    return tiny_demo_overrides(tmp)


@pytest.fixture(scope="module")
def two_stage(tiny_demo_run):
    return tiny_demo_run


def test_second_stage_starts_from_first_stage_weights(two_stage) -> None:
    cfg, result, snapshots, _ = two_stage
    align, instruct = result.stages
    handed = full_state(cfg, align.handover)  # the base checkpoints plus align's delta
    start = snapshots[1]  # the instruct model after restore and LoRA, before training
    connector_keys = [k for k in handed if k.startswith("connector.")]
    assert connector_keys
    for key in connector_keys:
        assert torch.equal(start[key], handed[key]), key
    # the trained connector differs from a fresh one: stage 1 really changed it
    assert any(not torch.equal(snapshots[0][k], handed[k]) for k in connector_keys)
    # LLM weights reach stage 2 unchanged (LoRA wraps them: base_layer names)
    llm_key = next(k for k in handed if k.startswith("llm.") and k.endswith("q_proj.weight"))
    peft_key = next(
        k
        for k in start
        if k.endswith(llm_key.removeprefix("llm.").replace("q_proj.weight", "q_proj.base_layer.weight"))
    )
    assert torch.equal(start[peft_key], handed[llm_key])


def test_losses_fall_in_both_stages(two_stage) -> None:
    _, result, _, _ = two_stage
    for stage in result.stages:
        assert len(stage.losses) >= 20, stage.name
        first, last = stage.losses[:5], stage.losses[-5:]
        assert sum(last) / 5 < 0.6 * sum(first) / 5, (stage.name, first, last)


def test_handover_holds_lora_factors_and_restores_merged(two_stage) -> None:
    from pipeline.handover import load_handover, read_manifest

    cfg, result, _, _ = two_stage
    align, instruct = (s.handover for s in result.stages)
    delta = load_handover(instruct)["state_dict"]  # both stages' deltas
    manifest = read_manifest(instruct)
    assert manifest["previous"] == "../align/handover.json" and manifest["structure"] == []
    assert manifest["lora"] == OmegaConf.to_container(cfg.stages.instruct.lora)
    own = set(delta) - set(load_handover(align)["state_dict"])
    # instruct's own delta: the LoRA factors of every adapted Linear, nothing of the frozen LLM or vision tower
    factors = {k for k in own if ".lora_A." in k or ".lora_B." in k}
    assert factors and own - factors == set() and not any(k.startswith("vision.") for k in delta)
    restored = full_state(cfg, instruct)  # merged on restore: plain names, no adapters
    assert not any("lora_" in k or "base_layer" in k for k in restored)
    assert any(k.endswith("q_proj.weight") for k in restored)


def test_evaluation_files_and_table(two_stage) -> None:
    import json

    from pipeline.runner import format_table, results_rows

    cfg, result, _, _ = two_stage
    ev = result.stages[-1].evaluation
    lines = ev.predictions_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == ev.count > 0
    # LLaVA-Med's prediction fields first, then ours
    assert list(records[0])[:6] == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert {"answer", "answer_type", "task", "dataset", "modality"} <= set(records[0])
    metrics = json.loads((ev.predictions_file.parent / "metrics.json").read_text())
    assert metrics["metrics"]["closed_accuracy"] == pytest.approx(ev.metrics["closed_accuracy"])
    assert set(metrics["report"]["protocols"]) == {
        "default",
        "llava_med",
        "llava_med_ad758b6",
        "med_moe",
        "uni_med",
        "medplib",
    }
    report_md = (ev.predictions_file.parent / "report.md").read_text()
    assert "## Protocols" in report_md and "## By dataset, answer type and modality" in report_md
    table = format_table(results_rows(result))
    assert "align" in table and "instruct" in table and "majority closed" in table


def test_mlflow_records_parent_and_nested_runs(two_stage) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, _, tmp = two_stage
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    parent = client.get_run(result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert sorted(r.info.run_name for r in children) == ["align", "instruct"]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    # the recipe as params (non-default values and the recipe keys) and the resolved config as an artifact
    assert parent.data.params["model.llm.path"] == "tiny:llama"
    assert parent.data.params["stages.instruct.lora.r"] == "16"
    assert parent.data.tags["recipe"] == "demo"
    artifacts = [a.path for a in client.list_artifacts(result.parent_run_id)]
    assert "config.yaml" in artifacts
    results = [a.path for a in client.list_artifacts(result.parent_run_id, "results")]
    assert results == ["results/results.json", "results/results_table.txt"]
    config_text = Path(client.download_artifacts(result.parent_run_id, "config.yaml", str(tmp))).read_text()
    assert "phantom_slake" in config_text
    # per-stage metrics: a training curve, validation loss, test metrics and the baseline
    for child in children:
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) >= 3
        assert "val/loss" in child.data.metrics
        # one evaluation path: the headline metric is the de-duplicated evaluation's number, logged once
        ev = next(s.evaluation for s in result.stages if s.name == child.info.run_name)
        assert child.data.metrics["eval/closed_accuracy"] == ev.metrics["closed_accuracy"]
        assert not [k for k in child.data.metrics if k.startswith("test/")]
        assert "baseline/closed_accuracy" in child.data.metrics
        evaluation = [a.path for a in client.list_artifacts(child.info.run_id, "evaluation")]
        assert sorted(evaluation) == [
            "evaluation/metrics.json",
            "evaluation/predictions.jsonl",
            "evaluation/predictions_table.json",
            "evaluation/report.md",
        ]
        assert "eval/closed_accuracy_llava_med" in child.data.metrics  # each released script's rule, by name


def test_evaluate_command_on_handover(two_stage, capsys) -> None:
    from pipeline.cli import main

    cfg, result, _, tmp = two_stage
    code = main(
        [
            "evaluate",
            str(DEMO),
            *tiny_overrides(tmp),
            f"ckpt={result.stages[-1].handover}",
            f"output_dir={tmp}/eval-out",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "closed_accuracy" in out and "predictions:" in out
    # its own folder, never training's eval/, and what produced the numbers: the weights (with their hash),
    # the split of each dataset as released and each protocol's released script
    assert not (tmp / "eval-out" / "eval").exists()
    (folder,) = (tmp / "eval-out" / "evaluations").iterdir()
    assert folder.name.endswith("-instruct") and (folder / "predictions.jsonl").is_file()
    provenance = json.loads((folder / "metrics.json").read_text())["provenance"]
    handover = Path(result.stages[-1].handover)
    assert provenance["weights"]["source"] == str(handover)
    assert provenance["weights"]["sha256"] == hashlib.sha256(handover.read_bytes()).hexdigest()
    assert provenance["split"] == "test" and provenance["datasets"]["phantom_slake"]["release_split"] == "test"
    assert "jiangsongtao/Med-MoE" in provenance["protocols"]["med_moe"]


def test_run_records_hardware_fingerprints_plots_and_registered_model(two_stage) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.registry import load_registered
    from pipeline.reproducibility import is_x86_64

    cfg, result, _, tmp = two_stage
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["hardware.cpu_count"].isdigit()
    assert parent.data.tags["medpipe.version"]  # and medpipe.commit / cwd.git_commit: tests/tracking/
    assert parent.data.tags.get("cwd.git_dirty", "false") in ("true", "false")
    # what decides the numbers besides seed and code: the demo's one thread and (on x86-64) portable kernels
    assert parent.data.tags["repro.intra_op_threads"] == str(cfg.trainer.num_threads) == "1"
    if is_x86_64():
        assert (parent.data.tags["repro.cpu_capability"], parent.data.tags["repro.mkl_cbwr"]) == ("AVX2", "AVX2")
    child = next(r for r in client.search_runs([parent.info.experiment_id]) if r.info.run_name == "instruct")
    # dataset fingerprint: counts as params, hashes of the annotation files as an artifact
    assert int(child.data.params["data.phantom_slake.train.records"]) > 0
    assert len(child.data.params["data.phantom_slake.sha256"]) == 16
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/learning_curve.png"]
    assert "data/fingerprints.json" in [a.path for a in client.list_artifacts(child.info.run_id, "data")]
    # the final model is in the registry and loads in one call, with the weights of the last stage
    assert result.model_uri == "models:/medpipe-demo/1"
    built = load_registered(result.model_uri, tracking_uri=uri)
    handed = full_state(cfg, result.stages[-1].handover)  # the base checkpoints and every delta of the chain
    loaded = built.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in handed.items())


def test_unreachable_tracking_server_fails_fast(tmp_path) -> None:
    import socket
    import time

    from pipeline.runner import run_experiment
    from pipeline.tracking import TrackingError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(DEMO, [*tiny_overrides(tmp_path), f"mlflow.tracking_uri=http://127.0.0.1:{port}"])
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=f"http://127.0.0.1:{port} is unreachable"):
        run_experiment(cfg)
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out" / "stages").exists()  # nothing was built or trained
