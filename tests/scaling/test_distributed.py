"""DDP and multi-node runs on CPU with gloo, launched by torchrun as on a cluster.

Every launch uses the tiny one-stage experiment of ``launch.py`` (tiny CLIP + tiny Llama, the
connector and the LLM training, 16 synthetic SLAKE images).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch import REPO, VENV_BIN, WORKER, free_port, rank_logs, run, torchrun, write_experiment

pytestmark = pytest.mark.slow

STEPS = 3


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def check(done, log_dir: Path | None = None) -> None:
    if done.returncode != 0:
        logs = "".join(rank_logs(log_dir, r)[-3000:] for r in (0, 1)) if log_dir else ""
        raise AssertionError(f"launch failed ({done.returncode}):\n{done.stderr[-3000:]}\n{logs}")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path) -> Path:
    """The experiment YAML; its synthetic data written here once, before any rank reads it."""
    from omegaconf import OmegaConf

    from datamodules.writers import ensure_synthetic
    from pipeline.config import load_config

    tmp = tmp_path_factory.mktemp("scaling")
    path = write_experiment(tmp, tmp / "data")
    cfg = load_config(path, [f"output_dir={tmp}/unused"])
    ensure_synthetic(OmegaConf.to_object(cfg.data.datasets.phantoms))
    return path


def overrides(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", *extra]


def run_in_process(experiment: Path, out: Path, *extra: str):
    from pipeline import runner
    from pipeline.config import load_config

    cfg = load_config(experiment, overrides(out, *extra))
    return cfg, runner.run_experiment(cfg)


def test_ddp_two_ranks_agree_and_equal_one_process_with_the_same_global_batch(experiment: Path, tmp_path: Path) -> None:
    """2 ranks x micro-batch 2 against 1 process x micro-batch 2 x accumulate 2: the same 4 samples per
    optimiser step, split into the same micro-batches (one_task_per_batch makes the sampler hand out
    whole blocks of 2: rank r at step t gets block 2t+r, the single process blocks 2t and 2t+1), so each
    micro-batch's token-mean loss is the same and DDP's gradient average equals accumulation's."""
    common = (
        "data.mixture.one_task_per_batch=true",
        "data.batch_size=2",
        "evaluation.enabled=false",
        f"stages.train.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
    )
    ddp_out = tmp_path / "ddp"
    log_dir = tmp_path / "logs"
    done = run(
        torchrun(nproc=2, port=free_port(), log_dir=log_dir)
        + [str(WORKER), str(experiment), *overrides(ddp_out, "trainer.devices=2", *common)]
    )
    check(done, log_dir)
    ranks = [torch.load(ddp_out / "stages" / "train" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    handover_file = ddp_out / "stages" / "train" / "handover.json"

    cfg, _ = run_in_process(experiment, tmp_path / "single", "trainer.accumulate_grad_batches=2", *common)
    single_file = tmp_path / "single" / "stages" / "train" / "handover.json"

    import lightning as L
    from runs import full_state

    from pipeline.model_factory import build_model

    L.seed_everything(cfg.seed, verbose=False)
    initial = build_model(cfg.model, cache_dir=cfg.cache_dir).model.state_dict()
    handover, single = full_state(cfg, handover_file), full_state(cfg, single_file)  # base + the stage's delta

    assert max_abs_diff(ranks[0], ranks[1]) == 0.0  # DDP keeps the replicas bit-identical
    assert max_abs_diff(ranks[0], handover) == 0.0
    moved = max_abs_diff(single, initial)
    difference = max_abs_diff(ranks[0], single)
    print(f"DDP vs single process: max |dw| = {difference:.3g}; training moved weights by up to {moved:.3g}")
    assert moved > 1e-3  # lr 1e-3, 3 Adam steps: the comparison is not between untrained models
    assert difference < 1e-5  # measured 2.3e-7: float summation order only (gloo all-reduce vs accumulation)


@pytest.mark.parametrize(
    "trained",
    [
        ["stages.train.train=[connector,llm]", "evaluation.enabled=true"],  # evaluated too: as ddp, not sharded
        [  # LoRA merged into the sharded weights before the hand-over (peft's merge on DTensors)
            "stages.train.train=[connector,lora]",
            "stages.train.lora={r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}",
        ],
    ],
    ids=["llm", "lora"],
)
def test_fsdp2_ranks_hand_over_their_shards_and_equal_one_process(
    experiment: Path, tmp_path: Path, trained: list[str]
) -> None:
    """``trainer.strategy=fsdp2`` (Lightning's ModelParallelStrategy: FSDP2 over gloo, on CPU) on 2 ranks: every
    weight is a DTensor sharded on dimension 0, and each rank writes its own shards of the stage's delta (no
    rank gathers the model). Restored, the weights equal a 1-process run's with the same global batch, as in
    the DDP test above (FSDP2 averages the gradients with a reduce-scatter instead of an all-reduce)."""
    from runs import full_state

    from pipeline.handover import load_handover, read_manifest

    common = (
        "data.mixture.one_task_per_batch=true",
        "data.batch_size=2",
        "evaluation.enabled=false",
        f"stages.train.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
        *trained,
    )
    out, log_dir = tmp_path / "fsdp2", tmp_path / "logs"
    done = run(
        torchrun(nproc=2, port=free_port(), log_dir=log_dir)
        + [str(WORKER), str(experiment), *overrides(out, "trainer.devices=2", "trainer.strategy=fsdp2", *common)]
    )
    check(done, log_dir)
    handover = out / "stages" / "train" / "handover.json"
    manifest = read_manifest(handover)
    files = [entry["file"] for entry in manifest["delta"]]
    assert files == ["handover-rank00000-of-00002.safetensors", "handover-rank00001-of-00002.safetensors"]
    from safetensors import safe_open

    shards = []
    for name in files:
        with safe_open(str(handover.parent / name), "pt") as f:
            shards.append({k: f.get_slice(k).get_shape() for k in f.keys()})  # noqa: SIM118 (safe_open has no iter)
    # every trained weight (connector, whole LLM) is sharded: each rank's file holds its rows of each
    assert set(shards[0]) == set(shards[1]) == set(manifest["sharded_keys"]) and len(shards[0]) >= 6

    cfg, _ = run_in_process(experiment, tmp_path / "single", "trainer.accumulate_grad_batches=2", *common)
    sharded = full_state(cfg, handover)
    single = full_state(cfg, tmp_path / "single" / "stages" / "train" / "handover.json")
    import lightning as L

    from pipeline.model_factory import build_model

    L.seed_everything(cfg.seed, verbose=False)
    initial = build_model(cfg.model, cache_dir=cfg.cache_dir).model.state_dict()
    single_delta = load_handover(tmp_path / "single" / "stages" / "train" / "handover.json")["state_dict"]
    assert set(single_delta) == set(manifest["sharded_keys"])  # the same keys, whole in one file
    for key in manifest["sharded_keys"]:  # FSDP2's split of dimension 0: ceil(rows / 2) rows on rank 0
        full = list(single_delta[key].shape)
        assert shards[0][key] == [-(-full[0] // 2), *full[1:]], key
        assert shards[1][key] == [full[0] // 2, *full[1:]], key
    moved, difference = max_abs_diff(single, initial), max_abs_diff(sharded, single)
    print(
        f"FSDP2 (2 ranks) vs single process: max |dw| = {difference:.3g}; training moved weights by up to {moved:.3g}"
    )
    assert moved > 1e-3
    assert difference < 1e-5
    if cfg.evaluation.enabled:  # the 2-rank evaluation (each rank a whole model) answers as the 1 process does
        answers = [
            {r["question_id"]: r["text"] for r in map(json.loads, (run / "eval" / "predictions.jsonl").open())}
            for run in (out, tmp_path / "single")
        ]
        assert len(answers[0]) == 7 and answers[0] == answers[1]


@pytest.fixture(scope="module")
def two_nodes(experiment: Path, tmp_path_factory: pytest.TempPathFactory):
    """`medpipe train`, unchanged, as two torchrun 'nodes' of one process each meeting on 127.0.0.1.
    The test split has 7 questions: with 2 ranks Lightning's DistributedSampler pads it to 8."""
    import subprocess

    from launch import child_env

    tmp = tmp_path_factory.mktemp("two-nodes")
    out = tmp / "out"
    port = free_port()
    args = [
        "--no-python",
        str(VENV_BIN / "medpipe"),
        "train",
        str(experiment),
        *overrides(
            out, "trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp", f"stages.train.max_steps={STEPS}"
        ),
    ]
    procs = [
        subprocess.Popen(
            torchrun(nproc=1, nnodes=2, node_rank=node, port=port, log_dir=tmp / f"node{node}") + args,
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        results.append((proc.returncode, stdout, stderr))
    return tmp, out, results


def test_two_node_launch_runs_medpipe_train_unchanged_and_only_rank_zero_reports(two_nodes) -> None:
    tmp, out, results = two_nodes
    for node, (code, _, stderr) in enumerate(results):
        assert code == 0, f"node {node} failed:\n{stderr[-2000:]}\n{rank_logs(tmp / f'node{node}', 0)[-4000:]}"
    node0, node1 = rank_logs(tmp / "node0", 0), rank_logs(tmp / "node1", 0)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in node0 and "GLOBAL_RANK: 1, MEMBER: 2/2" in node1
    # rank 0 logs, shows progress and prints the results table; rank 1 stays silent
    assert "medpipe: stage train: training" in node0 and "closed acc" in node0 and "Epoch 0" in node0
    assert "medpipe:" not in node1 and "closed acc" not in node1
    assert "Epoch 0" not in node1 and "Testing" not in node1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("scaling").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["evaluate", "scaling", "train"]  # one set, from rank 0
    steps = [
        m.step
        for m in client.get_metric_history([r for r in runs if r.info.run_name == "train"][0].info.run_id, "train/loss")
    ]
    assert steps == list(range(STEPS))


def test_distributed_evaluation_gives_exactly_the_single_process_metrics(two_nodes, experiment: Path) -> None:
    tmp, out, results = two_nodes
    assert all(code == 0 for code, _, _ in results)
    distributed = json.loads((out / "eval" / "metrics.json").read_text())
    assert distributed["n_scored"] == distributed["n_expected"] == 7 and distributed["padding_duplicates_removed"] == 1

    from pipeline.config import load_config
    from pipeline.runner import evaluate_handover
    from pipeline.tracking import Tracker

    cfg = load_config(experiment, overrides(tmp / "single"))
    tracker = Tracker(tracking_uri=cfg.mlflow.tracking_uri, experiment_name="single-eval")
    single = evaluate_handover(
        cfg, out / "stages" / "train" / "handover.json", tracker=tracker, out_dir=tmp / "single" / "eval"
    )
    assert single.count == 7
    assert distributed["all_metrics"] == single.metrics  # exact, every protocol and breakdown

    def texts(path: Path) -> dict[str, str]:
        return {p["question_id"]: p["text"] for p in map(json.loads, path.read_text().splitlines())}

    assert texts(out / "eval" / "predictions.jsonl") == texts(single.predictions_file)


def test_moe_expert_without_tokens_on_a_rank_trains_under_ddp(tmp_path: Path) -> None:
    """MoEFeedForward under DDP(find_unused_parameters=False): rank 1's tokens never reach expert 0,
    no token reaches expert 2; gradients equal the single-process gradient of both ranks' data."""
    out = tmp_path / "moe.json"
    worker = Path(__file__).resolve().parent / "moe_ddp_worker.py"
    log_dir = tmp_path / "logs"
    check(run(torchrun(nproc=2, port=free_port(), log_dir=log_dir) + [str(worker), str(out)], timeout=150), log_dir)
    reports = json.loads(out.read_text())
    rank0, rank1 = reports
    for step0, step1 in zip(rank0["steps"], rank1["steps"], strict=True):
        assert step1["local_routed"][0] == 0 and step0["local_routed"][0] > 0  # expert 0: rank 0 only
        assert step0["local_routed"][2] == step1["local_routed"][2] == 0  # expert 2: nobody
        for step in (step0, step1):
            assert step["grad_max_diff"] < 1e-7
            assert step["expert_grad_norms"][0] > 0 and step["expert_grad_norms"][2] == 0.0
        assert step0["expert_grad_norms"] == step1["expert_grad_norms"]  # all-reduced: the same on both
    assert rank0["weight_max_diff"] < 1e-7 and rank1["weight_max_diff"] < 1e-7


def test_moe_layer_gives_every_parameter_a_gradient_on_a_batch_of_padding_only() -> None:
    """No real token: every parameter (router included) still gets a gradient, all exactly 0, so DDP
    (find_unused_parameters=False) does not wait; the output is exactly 0 (no expert computed anything)."""
    from lightningmodules.models.moe import MoEFeedForward, moe_context

    layer = MoEFeedForward.build(hidden_size=6, ffn_size=8, num_experts=3)
    with moe_context(layer, torch.zeros(2, 4, dtype=torch.bool)) as context:  # (B, T): padding only
        out = layer(torch.randn(2, 4, 6))
    out.sum().backward()
    assert [n for n, p in layer.named_parameters() if p.grad is None] == []
    assert all(float(p.grad.abs().max()) == 0.0 for p in layer.parameters())
    assert float(out.detach().abs().max()) == 0.0 and context.stats[layer].num_tokens == 0
