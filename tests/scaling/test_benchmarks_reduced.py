"""Every benchmark runs in its reduced mode (seconds, tiny sizes) and reports the documented JSON keys; the
equality checks hold (eval tokens identical to transformers' Llava, the connector baseline's FLOPs equal to the
CMoE's, pipeline-overhead sides doing the same work); the README table script reads the results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
SPREAD = {"median", "min", "max", "q1", "q3", "n"}
HEADER = {"benchmark", "reduced", "rounds", "threads", "load_average", "machine"}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


_cache: dict[str, dict] = {}


def reduced(name: str, results_dir: Path, *extra: str) -> dict:
    """The benchmark's JSON from a ``--reduced --json`` run (once per module), also written to results_dir."""
    if name not in _cache:
        out = results_dir / f"{name}.json"
        run = subprocess.run(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--reduced", "--json", "--out", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert json.loads(out.read_text()) == result
        _cache[name] = result
    return _cache[name]


def check_header(result: dict, name: str) -> None:
    assert HEADER <= set(result), HEADER - set(result)
    assert result["benchmark"] == name and result["reduced"] is True
    load = result["load_average"]
    assert len(load["start"]) == 3 and len(load["end"]) == 3
    assert result["threads"] >= 1 and result["rounds"] >= 1


def is_spread(value: dict) -> bool:
    return set(value) == SPREAD and value["min"] <= value["median"] <= value["max"]


def test_connector_baseline_does_the_cmoe_arithmetic(results_dir: Path) -> None:
    r = reduced("connector", results_dir)
    check_header(r, "connector")
    assert set(r["ratios"]) == {"soft", "sparse", "soft_small_router", "sparse_small_router"}
    assert all(is_spread(v) for v in r["ratios"].values())
    assert r["cmoe_soft_over_plain"] == r["ratios"]["soft"]["median"]
    assert r["cmoe_sparse_over_plain"] == r["ratios"]["sparse"]["median"]
    assert all(is_spread(v) for v in r["ms"].values()) and len(r["ms"]) == 8
    for name, flops in r["flops"].items():
        assert flops["cmoe"] > 0 and flops["plain"] > 0, name
        assert abs(flops["cmoe"] - flops["plain"]) <= 0.01 * flops["plain"], (name, flops)
        assert 0 < flops["router_share"] < 1
    assert r["flops"]["sparse"]["cmoe"] == r["flops"]["sparse"]["plain"]  # no bias matmul: exactly equal
    assert r["flops_equal"] is True and r["same_routing"] is True
    assert max(r["max_abs_output_diff"].values()) <= 1e-4


def test_pipeline_overhead_sides_do_the_same_work(results_dir: Path) -> None:
    r = reduced("pipeline_overhead", results_dir)
    check_header(r, "pipeline_overhead")
    assert is_spread(r["medpipe_over_plain"])
    assert set(r["ms_per_step"]) == {"medpipe", "plain"} and all(is_spread(v) for v in r["ms_per_step"].values())
    medpipe, plain = r["work"]["medpipe"], r["work"]["plain"]
    for key in ("steps", "val_batches", "checkpoints", "mlflow_log_batch_calls", "mlflow_metrics_logged"):
        assert medpipe[key] == plain[key] > 0, key
    assert r["max_abs_loss_diff"] == 0.0  # the same model, data, RNG draws and optimiser: the same losses
    # host syncs counted per step: the plain loop reads its loss once per step, medpipe does more
    syncs = r["syncs_per_step"]
    assert set(syncs) == {"medpipe", "plain"} and syncs["plain"] >= 1 and syncs["medpipe"] >= syncs["plain"]
    assert sum(r["sync_calls"]["plain"].values()) == sum(r["sync_sites"]["plain"].values())
    assert "sync_count_method" in r and "teardown_sync_calls" in r


def test_eval_throughput_tokens_identical_to_hf_llava(results_dir: Path) -> None:
    r = reduced("eval_throughput", results_dir)
    check_header(r, "eval_throughput")
    assert r["tokens_identical"] is True
    for key in ("ours_over_hf_llava", "ours_over_batch1", "forced_ours_over_hf_llava", "forced_ours_over_batch1"):
        assert is_spread(r[key]), key
    for mode in ("eos", "forced"):
        assert set(r["tokens_per_s"][mode]) == {"ours", "hf_llava", "ours_batch1"}
        assert r["generated_tokens"][mode]["ours"] == r["generated_tokens"][mode]["hf_llava"] > 0
    forced = r["generated_tokens"]["forced"]["ours"]
    assert forced == r["samples"] * r["max_new_tokens"]  # every sequence forced to full length
    assert 0 <= r["batch1_same_tokens_fraction"]["eos"] <= 1


def test_data_throughput_real_loader_at_two_sizes(results_dir: Path) -> None:
    r = reduced("data_throughput", results_dir)
    check_header(r, "data_throughput")
    small, large = r["sizes"]
    labels = list(r["rss"])
    assert len(labels) == 2 and small < large
    for size in labels:
        assert is_spread(r["loader_samples_per_s"][size]["workers0"])
        assert is_spread(r["loader_over_consumption"][size]["workers0"])
        assert is_spread(r["first_batch_seconds"][size]["workers0"])
        rss = r["rss"][size]
        assert {"records", "rss_mb", "peak_rss_mb", "rss_growth_mb", "rss_before_mb", "read_seconds"} <= set(rss)
    assert [r["rss"][size]["records"] for size in labels] == [small, large]
    assert r["rss_ratio"]["records"] == large / small
    assert {"rss", "peak_rss", "growth"} <= set(r["rss_ratio"])
    assert is_spread(r["consumption_samples_per_s"])


def test_moe_benchmark_reports_spreads(results_dir: Path) -> None:
    r = reduced("moe", results_dir)
    check_header(r, "moe")
    for key in ("moe_over_dense", "ours_over_hf_mixtral", "ours_over_naive"):
        assert is_spread(r["ratios"][key]) and r[key] == pytest.approx(r["ratios"][key]["median"], abs=1e-3)
    assert r["max_abs_diff_ours_vs_hf"] < 1e-4


def test_gpu_check_runs_reduced_on_cpu_and_says_so(results_dir: Path) -> None:
    r = reduced("gpu_check", results_dir)
    check_header(r, "gpu_check")
    assert r["cpu_reduced"] is True and "CPU REDUCED" in r["note"] and r["device"] == "cpu"
    for phase in (r["dense"], r["dense_ddp"], r["moe"]["loop"]):
        assert is_spread(phase["step_seconds"]) and is_spread(phase["tokens_per_s"]) and phase["flops_per_step"] > 0
    assert r["dense_ddp"]["backend"] == "gloo"
    assert r["moe"]["loop"]["flops_per_step"] > r["dense"]["flops_per_step"]  # top-2 experts in upcycled layers
    if "grouped_mm" in r["moe"]:
        assert is_spread(r["moe"]["grouped_mm_over_loop"])
        assert r["moe"]["max_abs_loss_diff_grouped_vs_loop"] < 1e-2  # bf16 autocast on both


def test_readme_table_reads_the_results(results_dir: Path) -> None:
    for name in ("connector", "pipeline_overhead", "eval_throughput", "data_throughput", "moe", "gpu_check"):
        reduced(name, results_dir)
    run = subprocess.run(
        [sys.executable, str(BENCHMARKS / "readme_table.py"), "--results", str(results_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith("| `benchmarks/")]
    assert len(rows) == 11 and not any("no results" in row for row in rows)
    assert all(row.count("|") == 5 for row in rows)
