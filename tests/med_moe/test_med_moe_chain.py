"""The tiny Med-MoE chain end to end: stage 1 -> stage 2 -> router -> stage 3 (MoE), then evaluation.

One run per LLM family (tiny Llama: gated FFN; tiny Phi: ungated with biases), made by
``tests/runs.py::run_tiny_med_moe`` (one intra-op thread: ``trainer.num_threads`` in tiny.yaml). Each stage's starting
weights are snapshotted (when the runner sets the trainable groups, after restore and MoE conversion)
and compared by value with the previous stage's hand-over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Last epoch's mean training loss / first epoch's must stay below these. Measured (portable kernels, one
# thread): llama 0.59 / 0.60 / 0.36 / 0.82, phi 0.984 / 0.84 / 0.62 / 0.990 for stage1 / stage2 / router /
# stage3. The tiny Phi is not pretrained (loss ~6), so its stage 1 and 3 only have to fall at all.
LOSS_FALL = {
    "llama": {"stage1": 0.75, "stage2": 0.8, "router": 0.6, "stage3": 0.92},
    "phi": {"stage1": 1.0, "stage2": 0.92, "router": 0.8, "stage3": 1.0},
}


@pytest.fixture(scope="module", params=["llama", "phi"])
def chain(request, tmp_path_factory):
    """(family, cfg, result, snapshots); the Llama run is the session's (the notebook test reads it too)."""
    if request.param == "llama":
        cfg, result, snapshots, _ = request.getfixturevalue("tiny_med_moe_run")
    else:
        from runs import run_tiny_med_moe

        cfg, result, snapshots, _ = run_tiny_med_moe(tmp_path_factory.mktemp(f"med_moe_{request.param}"), request.param)
    return request.param, cfg, result, snapshots


def _handover(cfg, result, name: str) -> dict[str, torch.Tensor]:
    """Every weight of the model stage ``name`` handed over (the base checkpoints plus the chain's deltas)."""
    from runs import full_state

    stage = next(s for s in result.stages if s.name == name)
    return full_state(cfg, stage.handover)


def _moe_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".router.")[0] for k in state if ".mlp.router.linear." in k})


def _dense_as_expert(handover: dict[str, torch.Tensor], prefix: str, family: str) -> dict[str, torch.Tensor]:
    """The dense FFN at ``prefix`` (``...layers.i.mlp``) in GroupedExperts layout."""
    if family == "llama":
        return {
            "w_in": torch.cat(
                [handover[f"{prefix}.gate_proj.weight"].t(), handover[f"{prefix}.up_proj.weight"].t()], dim=1
            ),
            "w_out": handover[f"{prefix}.down_proj.weight"].t(),
        }
    return {
        "w_in": handover[f"{prefix}.fc1.weight"].t(),
        "w_out": handover[f"{prefix}.fc2.weight"].t(),
        "b_in": handover[f"{prefix}.fc1.bias"],
        "b_out": handover[f"{prefix}.fc2.bias"],
    }


@pytest.mark.slow
def test_each_stage_starts_from_the_previous_stage_weights(chain) -> None:
    family, cfg, result, snapshots = chain
    assert [s.name for s in result.stages] == ["stage1", "stage2", "router", "stage3"]
    # stage 2 and the router stage: every weight handed over unchanged
    for previous, current in (("stage1", "stage2"), ("stage2", "router")):
        handed = _handover(cfg, result, previous)
        start = snapshots[current]
        for key, value in handed.items():
            assert torch.equal(start[key], value), (current, key)
    assert any(
        not torch.equal(snapshots["stage1"][k], v)
        for k, v in _handover(cfg, result, "stage1").items()
        if k.startswith("connector.")
    )  # stage 1 really trained the connector
    # the router stage changed only the classifier
    router_handover, stage2_handover = _handover(cfg, result, "router"), _handover(cfg, result, "stage2")
    assert {k for k in router_handover if k not in stage2_handover} == {
        "modality_classifier.linear.weight",
        "modality_classifier.linear.bias",
    }
    assert all(torch.equal(router_handover[k], v) for k, v in stage2_handover.items())

    # stage 3: every MoE layer = E copies of the router stage's dense FFN + that FFN as meta expert,
    # routers = the classifier; all other weights unchanged
    start = snapshots["stage3"]
    prefixes = _moe_prefixes(start)
    assert prefixes == [p for p in prefixes if p.endswith(".mlp")] and len(prefixes) >= 1
    classifier_w, classifier_b = (
        router_handover["modality_classifier.linear.weight"],
        router_handover["modality_classifier.linear.bias"],
    )
    for prefix in prefixes:
        assert torch.equal(start[f"{prefix}.router.linear.weight"], classifier_w)
        assert torch.equal(start[f"{prefix}.router.linear.bias"], classifier_b)
        dense = _dense_as_expert(router_handover, prefix, family)
        for name, value in dense.items():
            stacked = start[f"{prefix}.experts.{name}"]
            assert stacked.shape[0] == 3
            for e in range(3):
                assert torch.equal(stacked[e], value), (prefix, name, e)
        for key in (k for k in router_handover if k.startswith(prefix + ".")):
            assert torch.equal(start[key.replace(prefix + ".", prefix + ".meta_expert.")], router_handover[key])
    for key, value in router_handover.items():
        if not any(key.startswith(p + ".") for p in prefixes):
            assert torch.equal(start[key], value), key


@pytest.mark.slow
def test_frozen_router_unchanged_and_experts_trained(chain) -> None:
    _, cfg, result, snapshots = chain
    start, final = snapshots["stage3"], _handover(cfg, result, "stage3")
    prefixes = _moe_prefixes(final)
    for prefix in prefixes:
        for p in ("weight", "bias"):
            key = f"{prefix}.router.linear.{p}"
            assert torch.equal(final[key], start[key]), key
    assert all(not torch.equal(final[f"{p}.experts.w_in"], start[f"{p}.experts.w_in"]) for p in prefixes)
    # attention, norms and embeddings froze; the dense FFNs of the other layers trained (train: [connector, ffn])
    assert all(torch.equal(final[k], start[k]) for k in start if "self_attn" in k or "embed_tokens" in k)
    assert any(
        not torch.equal(final[k], start[k])
        for k in start
        if ".mlp." in k and not any(k.startswith(p + ".") for p in prefixes)
    )


@pytest.mark.slow
def test_the_chain_learns(chain) -> None:
    family, cfg, result, _ = chain
    for stage in result.stages:
        # an epoch covers the stage's whole training split once, so its mean loss carries none of the
        # batch-to-batch spread (single tiny batches differ 10x); the last epoch must clearly beat the first
        epochs = stage.epoch_losses
        assert len(epochs) >= 2, (stage.name, epochs)
        assert epochs[-1] < LOSS_FALL[family][stage.name] * epochs[0], (family, stage.name, epochs)
    router_dir = Path(cfg.output_dir) / "stages" / "router"
    report = json.loads((router_dir / "confusion_matrix.json").read_text())
    assert report["modalities"] == ["CT", "MRI", "X-Ray"] and report["count"] > 0
    assert sum(map(sum, report["matrix"])) == report["count"]
    assert report["accuracy"] > 0.5, report  # chance is ~1/3
    assert result.evaluation is not None and result.evaluation.count > 0  # evaluate rebuilt the MoE from the file


@pytest.mark.slow
def test_mlflow_has_router_and_expert_load_artifacts(chain) -> None:
    from mlflow.tracking import MlflowClient

    _, cfg, result, _ = chain
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = {s.name: s.run_id for s in result.stages}
    router_files = {f.path for f in client.list_artifacts(runs["router"], "router")}
    assert {"router/confusion_matrix.json", "router/confusion_matrix.png"} <= router_files
    router_metrics = client.get_run(runs["router"]).data.metrics
    assert "val/accuracy" in router_metrics and "router/val_accuracy_final" in router_metrics
    stage3 = client.get_run(runs["stage3"]).data.metrics
    loads = [k for k in stage3 if k.startswith("moe/layer0/load_expert")]
    assert len(loads) == 3 and "moe/dropped" in stage3 and "train/aux_loss" in stage3 and "train/lm_loss" in stage3
    assert any(k.startswith("moe/layer0/") and "/expert" in k and "load_" not in k for k in stage3)  # per modality
    files = {f.path for f in client.list_artifacts(runs["stage3"], "moe")}
    assert "moe/expert_load.json" in files
    summary = json.loads((Path(cfg.output_dir) / "stages" / "stage3" / "expert_load.json").read_text())
    assert set(summary["modalities"]) <= {"CT", "MRI", "X-Ray"} and summary["dropped_total"] == 0
