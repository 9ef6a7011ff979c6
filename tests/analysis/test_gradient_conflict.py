"""Per-task gradient conflict: cosine against hand values, training untouched, metrics in MLflow."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.gradient_conflict import GradientConflict, conflict_matrix, group_parameters


def test_conflict_matrix_hand_values() -> None:
    grads = {
        "a": {"g": torch.tensor([1.0, 0.0])},
        "b": {"g": torch.tensor([0.0, 2.0])},
        "c": {"g": torch.tensor([-3.0, 0.0])},
        "d": {"g": torch.tensor([1.0, 1.0])},
    }
    tasks, cos = conflict_matrix(grads, "g")
    assert tasks == ["a", "b", "c", "d"]
    expected = torch.tensor(
        [[1, 0, -1, 0.5**0.5], [0, 1, 0, 0.5**0.5], [-1, 0, 1, -(0.5**0.5)], [0.5**0.5, 0.5**0.5, -(0.5**0.5), 1]]
    )
    torch.testing.assert_close(cos, expected)


class ToyVLM(nn.Module):
    """connector -> dropout -> head; the loss is the MSE to ``labels`` (stands in for the LM loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.connector = nn.Linear(3, 4)
        self.experts = nn.Linear(4, 2)
        self.dropout = nn.Dropout(0.5)

    def forward(self, input_ids, labels, **_):
        out = self.experts(self.dropout(torch.tanh(self.connector(input_ids))))
        return SimpleNamespace(loss=((out - labels) ** 2).mean())


def test_measure_equals_autograd_by_hand_and_leaves_training_untouched() -> None:
    torch.manual_seed(0)
    model = ToyVLM()
    probes = {t: {"input_ids": torch.randn(5, 3), "labels": torch.randn(5, 2)} for t in ("refer", "vqa", "caption")}
    callback = GradientConflict(every_n_steps=1, groups=["connector", "experts"])
    callback.probes = probes
    module = SimpleNamespace(
        model=model, global_step=7, device=torch.device("cpu"), transfer_batch_to_device=lambda b, device, i: b
    )
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.train()
    rng = torch.get_rng_state()

    metrics = callback.measure(module)

    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    model.eval()
    flat = {}
    for task, batch in probes.items():
        loss = model(**batch).loss
        g = torch.autograd.grad(loss, list(model.connector.parameters()))
        flat[task] = torch.cat([x.reshape(-1) for x in g])
    cos = torch.nn.functional.cosine_similarity(flat["refer"], flat["vqa"], dim=0)
    assert metrics["grad_conflict/connector/refer.vs.vqa"] == pytest.approx(float(cos), abs=1e-6)
    pairs = [
        metrics[f"grad_conflict/connector/{a}.vs.{b}"]
        for a, b in (("caption", "refer"), ("caption", "vqa"), ("refer", "vqa"))
    ]
    assert metrics["grad_conflict/connector/mean_cos"] == pytest.approx(sum(pairs) / 3, abs=1e-6)
    assert metrics["grad_conflict/connector/negative_share"] == pytest.approx(sum(p < 0 for p in pairs) / 3)
    assert "grad_conflict/experts/refer.vs.vqa" in metrics
    assert callback.history[-1]["step"] == 7


def test_group_parameters_only_trainable_matches() -> None:
    model = ToyVLM()
    model.experts.bias.requires_grad_(False)
    groups = group_parameters(model, ["connector", "experts", "nothing"])
    assert [n for n, _ in groups["connector"]] == ["connector.weight", "connector.bias"]
    assert [n for n, _ in groups["experts"]] == ["experts.weight"] and "nothing" not in groups


@pytest.mark.slow
def test_grad_conflict_logged_to_mlflow_during_a_multitask_stage(tiny_conflict_run) -> None:
    from mlflow.tracking import MlflowClient

    _, result, tmp = tiny_conflict_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    instruct = client.get_run(result.stages[-1].run_id)
    history = client.get_metric_history(instruct.info.run_id, "grad_conflict/connector/caption.vs.vqa")
    steps = len(result.stages[-1].losses)
    assert steps >= 4 and [m.step for m in history] == [s - 1 for s in range(2, steps + 1, 2)]  # logged at step-1
    assert all(-1.0 <= m.value <= 1.0 for m in history)
    assert client.get_metric_history(instruct.info.run_id, "grad_conflict/lora/mean_cos")
    artifacts = [a.path for a in client.list_artifacts(instruct.info.run_id, "plots")]
    assert "plots/grad_conflict_connector.png" in artifacts
    assert [a.path for a in client.list_artifacts(instruct.info.run_id, "analysis")] == ["analysis/grad_conflict.json"]
    # one task in the align stage: nothing to compare, nothing logged
    align = client.get_run(result.stages[0].run_id)
    assert not any(k.startswith("grad_conflict/") for k in align.data.metrics)
