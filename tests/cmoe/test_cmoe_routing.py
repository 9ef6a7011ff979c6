"""Routing behaviour: weights, sparse dispatch, task ids, the routing record and its per-task means."""

from __future__ import annotations

import math

import pytest
import torch
from cmoe_reference import naive_router_logits

from lightningmodules.metrics.routing import mean_weights_by_task
from lightningmodules.models.cmoe import WEIGHTINGS, CMoEConnector
from lightningmodules.models.moe import DispatchPlan, MoEStats, RoutingRecord, moe_context

IN_DIM, OUT_DIM = 24, 16


def make(**kwargs) -> CMoEConnector:
    torch.manual_seed(0)
    defaults = {"in_dim": IN_DIM, "out_dim": OUT_DIM, "num_experts": 5, "num_tasks": 6, "task_embed_dim": 8}
    return CMoEConnector(**{**defaults, **kwargs})


def inputs(n: int = 6, p: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, p, IN_DIM, generator=g), torch.arange(n) % 6


def routed(cmoe: CMoEConnector, features: torch.Tensor, **kwargs) -> tuple[torch.Tensor, RoutingRecord, MoEStats]:
    """One forward in a step context: the output and what the connector recorded."""
    with moe_context(cmoe) as context:
        out = cmoe(features, **kwargs)
    return out, context.routing[cmoe], context.stats[cmoe]


@pytest.mark.parametrize("router_input", ["task_token", "token", "task"])
def test_soft_weights_are_positive_and_sum_to_one(router_input: str) -> None:
    cmoe = make(weighting="soft", router_input=router_input)
    features, task_ids = inputs()
    _, record, _ = routed(cmoe, features, task_ids=task_ids)
    weights = record.dense_weights()
    assert weights.shape == (6, 8, 5)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(6, 8))
    # sigmoid then normalise, not softmax
    scores = torch.sigmoid(naive_router_logits(cmoe, features, task_ids))
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sparse_runs_exactly_k_experts_per_token(top_k: int) -> None:
    """The experts compute each token exactly k times, each time in one of its top-k experts: the rows each
    expert's block holds (a pre-hook on the experts sees ``x`` and the plan) are matched to the tokens by value,
    and a hook on the activation sees what each expert really computed (one call per non-empty expert)."""
    cmoe = make(weighting="sparse", top_k=top_k)
    features, task_ids = inputs()
    tokens = features.reshape(-1, IN_DIM)  # (N*P, in)
    dispatched: list[tuple[torch.Tensor, DispatchPlan]] = []
    activations: list[torch.Tensor] = []  # input of each activation call: (n_e, F) pre-activation rows
    hooks = [
        cmoe.experts.register_forward_pre_hook(lambda _, args: dispatched.append((args[0].clone(), args[1]))),
        cmoe.experts.activation.register_forward_hook(lambda _, args, out: activations.append(args[0].clone())),
    ]
    _, record, stats = routed(cmoe, features, task_ids=task_ids)
    for hook in hooks:
        hook.remove()

    chosen = naive_router_logits(cmoe, features, task_ids).topk(top_k, dim=-1).indices.reshape(-1, top_k)
    expected = torch.zeros(tokens.shape[0], cmoe.num_experts, dtype=torch.long).scatter(1, chosen, 1)  # (N*P, E)
    (x, plan), experts = dispatched[0], cmoe.experts
    assert len(dispatched) == 1
    blocks = x[plan.token_index].split(plan.group_sizes)  # E x (n_e, in), grouped by expert
    seen = torch.zeros_like(expected)  # (N*P, E) times a token's row sat in an expert's block
    ran = [e for e, rows in enumerate(blocks) if rows.shape[0]]  # experts with rows, in the loop's order
    assert len(activations) == len(ran)  # each non-empty expert ran once, the empty ones never
    for e, rows in enumerate(blocks):
        token_index = (rows.unsqueeze(1) == tokens.unsqueeze(0)).all(-1).float().argmax(1)  # (n_e,)
        torch.testing.assert_close(tokens[token_index], rows, atol=0, rtol=0)
        seen[token_index, e] += 1
    for e, computed in zip(ran, activations, strict=True):  # what expert e's first matmul really computed
        torch.testing.assert_close(computed, blocks[e] @ experts.w_in[e] + experts.b_in[e], atol=1e-6, rtol=1e-5)
    assert torch.equal(seen, expected)
    assert sum(a.shape[0] for a in activations) == tokens.shape[0] * top_k
    assert [a.shape[0] for a in activations] == [n for n in expected.sum(0).tolist() if n]
    assert torch.equal(record.dense_weights() > 0, expected.view(6, 8, -1).bool())
    assert int(stats.kept_counts.sum()) == tokens.shape[0] * top_k
    assert stats.kept_counts.tolist() == expected.sum(0).tolist()
    assert stats.computed_rows == expected.sum(0).tolist()  # one block per expert, exactly its tokens
    weights = record.dense_weights()
    assert ((weights > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(6, 8))


def test_hard_routes_by_task_id_modulo_experts() -> None:
    cmoe = make(weighting="hard", num_experts=4)
    features, task_ids = inputs()  # tasks 0..5 -> experts 0, 1, 2, 3, 0, 1
    _, record, stats = routed(cmoe, features, task_ids=task_ids)
    weights = record.dense_weights()
    assert torch.equal(weights.argmax(-1), (task_ids % 4).unsqueeze(1).expand(6, 8))
    assert torch.equal(weights.sum(-1), torch.ones(6, 8))
    assert stats.kept_counts.tolist() == [16, 16, 8, 8]
    assert stats.computed_rows == [16, 16, 8, 8]  # rows of each expert's matmul


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
    _, record, _ = routed(cmoe, features, task_ids=torch.tensor([2, 2, 2, 4, 4, 4]))
    weights = record.dense_weights()  # (N, P, E)
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
    out, record, _ = routed(cmoe, features)
    assert out.shape == (6, 8, OUT_DIM)
    assert record.group_ids is None


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
    _, record, _ = routed(cmoe, features, task_ids=task_ids)
    assert not record.weights.requires_grad
    assert torch.equal(record.group_ids, task_ids)


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
    _, record, _ = routed(cmoe, features, task_ids=task_ids)
    weights = record.dense_weights()  # (6, 8, 5)
    means = mean_weights_by_task(weights, record.group_ids, cmoe.num_tasks)  # (6, 5)
    torch.testing.assert_close(means.sum(-1), torch.ones(6))
    torch.testing.assert_close(means[task_ids[0]], weights[0].mean(0))
