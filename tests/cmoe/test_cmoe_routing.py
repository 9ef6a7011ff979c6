"""Routing behaviour: weights, sparse dispatch, task ids, the routing record and its per-task means."""

from __future__ import annotations

import math

import pytest
import torch
from cmoe_reference import naive_router_logits

import lightningmodules.models.cmoe as cmoe_module
from lightningmodules.models.cmoe import WEIGHTINGS, CMoEConnector, mean_weights_by_task

IN_DIM, OUT_DIM = 24, 16


def make(**kwargs) -> CMoEConnector:
    torch.manual_seed(0)
    defaults = {"in_dim": IN_DIM, "out_dim": OUT_DIM, "num_experts": 5, "num_tasks": 6, "task_embed_dim": 8}
    return CMoEConnector(**{**defaults, **kwargs})


def inputs(n: int = 6, p: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, p, IN_DIM, generator=g), torch.arange(n) % 6


@pytest.mark.parametrize("router_input", ["task_token", "token", "task"])
def test_soft_weights_are_positive_and_sum_to_one(router_input: str) -> None:
    cmoe = make(weighting="soft", router_input=router_input)
    features, task_ids = inputs()
    cmoe(features, task_ids=task_ids)
    weights = cmoe.last_routing.weights
    assert weights.shape == (6, 8, 5)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(6, 8))
    # sigmoid then normalise, not softmax
    scores = torch.sigmoid(naive_router_logits(cmoe, features, task_ids))
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize("dispatch", ["per_expert", "padded"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sparse_runs_exactly_k_experts_per_token(top_k: int, dispatch: str, monkeypatch) -> None:
    """The expert matmuls see each token exactly k times, each time in one of its top-k experts (padded
    dispatch: the real rows of each expert's block; padding rows are dropped)."""
    cmoe = make(weighting="sparse", top_k=top_k)
    cmoe.experts.pad_slack = math.inf if dispatch == "padded" else 0.0
    features, task_ids = inputs()
    tokens = features.reshape(-1, IN_DIM)  # (N*P, in)
    calls: list[tuple[int, torch.Tensor]] = []
    padded_calls: list[torch.Tensor] = []
    block_forward = cmoe_module.expert_block_forward
    padded_forward = cmoe_module.padded_block_forward

    def counting_block_forward(rows: torch.Tensor, expert: int, *args: torch.Tensor) -> None:
        calls.append((expert, rows.clone()))
        block_forward(rows, expert, *args)

    def counting_padded_forward(blocks: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        padded_calls.append(blocks.clone())
        return padded_forward(blocks, *args)

    monkeypatch.setattr(cmoe_module, "expert_block_forward", counting_block_forward)
    monkeypatch.setattr(cmoe_module, "padded_block_forward", counting_padded_forward)
    cmoe(features, task_ids=task_ids)
    if dispatch == "padded":
        assert not calls and len(padded_calls) == 1  # every expert in one batched matmul
        (blocks,) = padded_calls
        assert blocks.shape[:2] == (cmoe.num_experts, max(cmoe.last_expert_token_counts))
        calls = [(e, blocks[e, :n]) for e, n in enumerate(cmoe.last_expert_token_counts) if n]
    else:
        assert not padded_calls

    chosen = naive_router_logits(cmoe, features, task_ids).topk(top_k, dim=-1).indices.reshape(-1, top_k)
    seen = torch.zeros(tokens.shape[0], cmoe.num_experts, dtype=torch.long)  # (N*P, E) times a token ran
    for expert, rows in calls:
        token_index = (rows.unsqueeze(1) == tokens.unsqueeze(0)).all(-1).float().argmax(1)  # (n,)
        torch.testing.assert_close(tokens[token_index], rows, atol=0, rtol=0)
        seen[token_index, expert] += 1
    assert sum(rows.shape[0] for _, rows in calls) == tokens.shape[0] * top_k
    assert len({e for e, _ in calls}) == len(calls)  # one matmul per non-empty expert
    expected = torch.zeros_like(seen).scatter(1, chosen, 1)
    assert torch.equal(seen, expected)
    assert cmoe.last_expert_token_counts == expected.sum(0).tolist()
    weights = cmoe.last_routing.weights
    assert ((weights > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(6, 8))


def test_hard_routes_by_task_id_modulo_experts() -> None:
    cmoe = make(weighting="hard", num_experts=4)
    features, task_ids = inputs()  # tasks 0..5 -> experts 0, 1, 2, 3, 0, 1
    cmoe(features, task_ids=task_ids)
    weights = cmoe.last_routing.weights
    assert torch.equal(weights.argmax(-1), (task_ids % 4).unsqueeze(1).expand(6, 8))
    assert torch.equal(weights.sum(-1), torch.ones(6, 8))
    assert cmoe.last_expert_token_counts == [16, 16, 8, 8]


def test_token_router_ignores_task_ids() -> None:
    cmoe = make(weighting="soft", router_input="token")
    features, task_ids = inputs()
    assert not hasattr(cmoe.router, "task_embedding")
    without = cmoe(features)
    torch.testing.assert_close(cmoe(features, task_ids=task_ids), without, atol=0, rtol=0)
    torch.testing.assert_close(cmoe(features, task_ids=(task_ids + 3) % 6), without, atol=0, rtol=0)


def test_task_router_gives_one_weighting_per_image_and_task() -> None:
    cmoe = make(weighting="soft", router_input="task")
    features, _ = inputs()
    cmoe(features, task_ids=torch.tensor([2, 2, 2, 4, 4, 4]))
    weights = cmoe.last_routing.weights  # (N, P, E)
    assert torch.equal(weights, weights[:, :1].expand_as(weights))  # same for every token of an image
    torch.testing.assert_close(weights[0], weights[1])
    assert not torch.allclose(weights[0], weights[3])


@pytest.mark.parametrize("weighting, router_input", [("soft", "task_token"), ("sparse", "task"), ("hard", "token")])
def test_missing_task_ids_is_a_clear_error(weighting: str, router_input: str) -> None:
    cmoe = make(weighting=weighting, router_input=router_input)
    features, _ = inputs()
    with pytest.raises(ValueError, match="needs task_ids"):
        cmoe(features)


@pytest.mark.parametrize("weighting, router_input", [("constant", "task_token"), ("soft", "token")])
def test_task_ids_are_optional_when_nothing_uses_them(weighting: str, router_input: str) -> None:
    cmoe = make(weighting=weighting, router_input=router_input)
    features, _ = inputs()
    assert cmoe(features).shape == (6, 8, OUT_DIM)
    assert cmoe.last_routing.task_ids is None


def test_task_ids_must_be_one_per_image() -> None:
    cmoe = make()
    features, _ = inputs()
    with pytest.raises(ValueError, match=r"task_ids must have shape \(6,\)"):
        cmoe(features, task_ids=torch.zeros(6, 8, dtype=torch.long))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_no_images_gives_no_tokens(weighting: str) -> None:
    cmoe = make(weighting=weighting)
    out = cmoe(torch.zeros(0, 8, IN_DIM), task_ids=torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 8, OUT_DIM)


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="weighting"):
        make(weighting="dense")
    with pytest.raises(ValueError, match="router_input"):
        make(router_input="image")
    with pytest.raises(ValueError, match="top_k"):
        make(weighting="sparse", top_k=6)


def test_routing_record_is_detached_and_keeps_the_task_ids() -> None:
    cmoe = make(weighting="sparse")
    features, task_ids = inputs()
    cmoe(features, task_ids=task_ids)
    record = cmoe.last_routing
    assert not record.weights.requires_grad
    assert torch.equal(record.task_ids, task_ids)


def test_mean_weights_by_task() -> None:
    weights = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],  # image 0, task 2: mean (0.5, 0.5)
            [[1.0, 0.0], [1.0, 0.0]],  # image 1, task 0: mean (1, 0)
            [[0.0, 1.0], [0.0, 1.0]],
        ]
    )  # image 2, task 0: mean (0, 1)
    means = mean_weights_by_task(weights, torch.tensor([2, 0, 0]), num_tasks=3)
    assert means.shape == (3, 2)
    torch.testing.assert_close(means[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(means[2], torch.tensor([0.5, 0.5]))
    assert all(math.isnan(v) for v in means[1].tolist())  # task 1 had no image


def test_mean_weights_by_task_from_a_forward() -> None:
    cmoe = make(weighting="soft")
    features, task_ids = inputs()
    cmoe(features, task_ids=task_ids)
    record = cmoe.last_routing
    means = mean_weights_by_task(record.weights, record.task_ids, cmoe.num_tasks)  # (6, 5)
    torch.testing.assert_close(means.sum(-1), torch.ones(6))
    torch.testing.assert_close(means[task_ids[0]], record.weights[0].mean(0))
