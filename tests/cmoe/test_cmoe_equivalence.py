"""The stacked CMoE equals plain references: the MLP connector, a per-expert loop, a masked dense mix."""

from __future__ import annotations

import itertools

import pytest
import torch
from cmoe_reference import naive_expert, naive_forward

from lightningmodules.models.cmoe import ROUTER_INPUTS, WEIGHTINGS, CMoEConnector
from lightningmodules.models.connector import MLPConnector
from lightningmodules.models.moe import moe_context

IN_DIM, OUT_DIM, NUM_TASKS = 24, 16, 6


def make(**kwargs) -> CMoEConnector:
    torch.manual_seed(0)
    defaults = {"in_dim": IN_DIM, "out_dim": OUT_DIM, "num_experts": 4, "num_tasks": NUM_TASKS, "task_embed_dim": 8}
    return CMoEConnector(**{**defaults, **kwargs})


def inputs(n: int = 5, p: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, p, IN_DIM, generator=g), torch.tensor([0, 1, 2, 5, 1])[:n]


def test_one_constant_expert_equals_the_mlp_connector() -> None:
    torch.manual_seed(0)
    mlp = MLPConnector(in_dim=IN_DIM, out_dim=OUT_DIM)
    cmoe = CMoEConnector.from_mlp(mlp, num_experts=1, weighting="constant")
    features, _ = inputs()
    torch.testing.assert_close(cmoe(features), mlp(features), atol=1e-6, rtol=0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_upcycled_experts_equal_the_mlp_for_every_weighting(weighting: str) -> None:
    """Every weighting sums to 1, so E copies of the MLP give the MLP's output."""
    torch.manual_seed(0)
    mlp = MLPConnector(in_dim=IN_DIM, out_dim=OUT_DIM)
    cmoe = CMoEConnector.from_mlp(mlp, num_experts=5, weighting=weighting, num_tasks=NUM_TASKS)
    features, task_ids = inputs()
    torch.testing.assert_close(cmoe(features, task_ids=task_ids), mlp(features), atol=1e-6, rtol=0)


@pytest.mark.parametrize("weighting, router_input", list(itertools.product(WEIGHTINGS, ROUTER_INPUTS)))
def test_stacked_equals_the_per_expert_loop(weighting: str, router_input: str) -> None:
    """Outputs and every parameter gradient match the naive loop (router on the concatenated input)."""
    cmoe = make(weighting=weighting, router_input=router_input)
    features, task_ids = inputs()
    features.requires_grad_(True)  # a trainable vision tower would need this gradient
    projection = torch.randn(OUT_DIM, generator=torch.Generator().manual_seed(2))
    named = [("features", features), *cmoe.named_parameters()]
    params = [p for _, p in named]

    fast = cmoe(features, task_ids=task_ids)
    slow = naive_forward(cmoe, features, task_ids)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)

    fast_grads = torch.autograd.grad((fast @ projection).sum(), params, allow_unused=True)
    slow_grads = torch.autograd.grad((slow @ projection).sum(), params, allow_unused=True)
    for (name, param), fast_grad, slow_grad in zip(named, fast_grads, slow_grads, strict=True):
        fast_grad = torch.zeros_like(param) if fast_grad is None else fast_grad  # unused experts: no grad
        slow_grad = torch.zeros_like(param) if slow_grad is None else slow_grad
        torch.testing.assert_close(fast_grad, slow_grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_equals_the_masked_dense_mix(top_k: int) -> None:
    cmoe = make(weighting="sparse", top_k=top_k)
    features, task_ids = inputs()
    torch.testing.assert_close(
        cmoe(features, task_ids=task_ids), naive_forward(cmoe, features, task_ids), atol=1e-5, rtol=1e-5
    )


def test_constant_is_the_mean_of_the_experts() -> None:
    cmoe = make(weighting="constant")
    features, _ = inputs()
    mean = torch.stack([naive_expert(cmoe, features, e) for e in range(cmoe.num_experts)]).mean(0)
    torch.testing.assert_close(cmoe(features), mean, atol=1e-6, rtol=1e-5)
    assert cmoe.router is None  # the router is neither built nor run


def test_hard_gives_each_image_the_output_of_its_task_expert() -> None:
    cmoe = make(weighting="hard", num_experts=4)
    features, task_ids = inputs()  # tasks 0, 1, 2, 5, 1 -> experts 0, 1, 2, 1, 1
    with moe_context(cmoe) as context:
        out = cmoe(features, task_ids=task_ids)
    for image, task in enumerate(task_ids.tolist()):
        expected = naive_expert(cmoe, features[image], task % 4)
        torch.testing.assert_close(out[image], expected, atol=1e-6, rtol=1e-5)
    stats = context.stats[cmoe]
    assert stats.kept_counts.tolist() == [7, 21, 7, 0]  # P = 7 tokens per image
    assert stats.computed_rows == [7, 21, 7, 0]  # rows of each expert's matmul; expert 3 never runs


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_runs_under_bfloat16_autocast(weighting: str) -> None:
    """bf16-mixed training: the grouped (out=) matmuls get inputs in the autocast dtype."""
    cmoe = make(weighting=weighting)
    features, task_ids = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cmoe(features, task_ids=task_ids)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), naive_forward(cmoe, features, task_ids), atol=0.05, rtol=0.05)
    assert cmoe.experts.w_in.grad.dtype == torch.float32 and cmoe.experts.w_in.grad.abs().sum() > 0
