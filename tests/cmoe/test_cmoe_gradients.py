"""Gradients reach the experts, the router and the task embeddings."""

from __future__ import annotations

import pytest
import torch

from lightningmodules.models.cmoe import CMoEConnector


@pytest.mark.parametrize("weighting", ["soft", "sparse"])
@pytest.mark.parametrize("router_input", ["task_token", "task"])
def test_gradients_reach_router_task_embeddings_and_experts(weighting: str, router_input: str) -> None:
    torch.manual_seed(0)
    cmoe = CMoEConnector(
        in_dim=12,
        out_dim=10,
        num_experts=3,
        weighting=weighting,
        router_input=router_input,
        num_tasks=4,
        task_embed_dim=6,
    )
    features = torch.randn(4, 6, 12)
    task_ids = torch.tensor([0, 2, 2, 0])
    out = cmoe(features, task_ids=task_ids)
    (out * torch.randn_like(out)).sum().backward()

    router = cmoe.router
    for name, param in [
        ("router.fc1_task.weight", router.fc1_task.weight),
        ("router.fc2.weight", router.fc2.weight),
        ("experts.w_in", cmoe.experts.w_in),
        ("experts.w_out", cmoe.experts.w_out),
        ("experts.b_in", cmoe.experts.b_in),
        ("experts.b_out", cmoe.experts.b_out),
    ]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    embedding_grad = router.task_embedding.weight.grad  # (num_tasks, t)
    assert embedding_grad[[0, 2]].abs().sum(-1).gt(0).all()  # used tasks learn
    assert embedding_grad[[1, 3]].abs().sum() == 0  # unused tasks do not
    if router_input == "task_token":
        assert router.fc1_token.weight.grad.abs().sum() > 0  # the token half of the router learns too


def test_constant_and_hard_train_only_the_experts() -> None:
    for weighting in ("constant", "hard"):
        torch.manual_seed(0)
        cmoe = CMoEConnector(in_dim=12, out_dim=10, num_experts=3, weighting=weighting, num_tasks=4)
        assert {name.split(".")[0] for name, _ in cmoe.named_parameters()} == {"experts"}
        cmoe(torch.randn(2, 4, 12), task_ids=torch.tensor([0, 1])).sum().backward()
        assert cmoe.experts.w_in.grad.abs().sum() > 0
