"""CMoE mixing overhead: the connector's forward+backward time over the sum of its parts as plain modules.

Shapes are Uni-Med's scaled down by 4 in every width: vision width 352 (EVA-CLIP g: 1408) -> concat4
input 1408 (paper 5632), d_llm 1024 (Llama-2-7B: 4096), task embedding 192 (paper 768), E = 5;
16 images x 64 visual tokens (64 is the paper's count after concat4) = 1024 tokens per step. Features
come from a frozen tower, so they need no gradient; every parameter does.

The parts, each an ordinary module on the same tokens:
- expert: nn.Sequential(Linear(in, d), GELU, Linear(d, d)); soft runs all E, sparse top-2 runs 2 on all
  tokens (the same FLOPs as 2 experts per token);
- router: nn.Sequential(Linear(router_in, ratio * router_in), GELU, Linear(.., E)) on the pre-built
  concatenation [token, task embedding] (router_in = 1408 + 192).

Ratios: ``cmoe_soft_over_parts`` = CMoE(soft) / (E experts + router); ``cmoe_sparse_over_parts`` =
CMoE(sparse, k=2) / (2 experts + router); ``router_share`` = router / CMoE(soft). Reported for the
paper's router (ratio 4) and a small one (``--small-ratio``). Rounds alternate over all variants (shuffled
order each round) so drift on a shared machine hits each; figures are medians.

    python benchmarks/connector.py [--rounds 7] [--small-ratio 0.25] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightningmodules.models.cmoe import CMoEConnector  # noqa: E402 (after sys.path)
from lightningmodules.models.moe import MoEContext, attach_context  # noqa: E402

TARGETS = {"cmoe_soft_over_parts": 1.10, "cmoe_sparse_over_parts": 1.30}


def expert_mlp(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def router_mlp(router_in: int, ratio: float, num_experts: int) -> nn.Module:
    hidden = max(1, round(ratio * router_in))
    return nn.Sequential(nn.Linear(router_in, hidden), nn.GELU(), nn.Linear(hidden, num_experts))


def step(modules: list[nn.Module], inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """One forward+backward of every module on its input, with fixed output gradients."""
    params = [p for m in modules for p in m.parameters()]

    def run() -> None:
        for p in params:
            p.grad = None
        outputs = [m(x) for m, x in zip(modules, inputs, strict=True)]
        torch.autograd.backward(outputs, grads)

    return run


def cmoe_step(
    cmoe: CMoEConnector, features: torch.Tensor, task_ids: torch.Tensor, grad: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        for p in cmoe.parameters():
            p.grad = None
        cmoe(features, task_ids=task_ids).backward(grad)

    return run


def build_variants(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, p, e = args.images, args.tokens, args.experts
    in_dim, d, task_dim = args.in_dim, args.d_llm, args.task_dim
    num_tokens = n * p
    features = torch.randn(n, p, in_dim, generator=g)  # (N, P, in)
    task_ids = torch.randint(0, 6, (n,), generator=g)  # (N,)
    out_grad = torch.randn(n, p, d, generator=g)  # (N, P, d)
    tokens = features.reshape(num_tokens, in_dim)  # (N*P, in)
    router_in = torch.randn(num_tokens, in_dim + task_dim, generator=g)  # (N*P, in + t) [token, task]
    token_grad = out_grad.reshape(num_tokens, d)  # (N*P, d)
    logit_grad = torch.randn(num_tokens, e, generator=g)  # (N*P, E)

    def cmoe(weighting: str, ratio: float) -> Callable[[], None]:
        module = CMoEConnector(
            in_dim=in_dim,
            out_dim=d,
            num_experts=e,
            weighting=weighting,
            top_k=2,
            router_hidden_ratio=ratio,
            task_embed_dim=task_dim,
        )
        attach_context(module, MoEContext())  # as in training: the connector records its routing
        return cmoe_step(module, features, task_ids, out_grad)

    def experts(count: int) -> Callable[[], None]:
        return step([expert_mlp(in_dim, d) for _ in range(count)], [tokens] * count, [token_grad] * count)

    def router(ratio: float) -> Callable[[], None]:
        return step([router_mlp(in_dim + task_dim, ratio, e)], [router_in], [logit_grad])

    return {
        "cmoe_soft": cmoe("soft", 4.0),
        "cmoe_sparse": cmoe("sparse", 4.0),
        "cmoe_soft_small": cmoe("soft", args.small_ratio),
        "cmoe_sparse_small": cmoe("sparse", args.small_ratio),
        "experts_all": experts(e),
        "experts_top2": experts(2),
        "router": router(4.0),
        "router_small": router(args.small_ratio),
    }


def measure(variants: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward+backward; each round runs every variant once, in a shuffled order
    (so a burst of load elsewhere does not always hit the same variant)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    for round_index in range(warmup + rounds):
        names = list(variants)
        order.shuffle(names)
        for name in names:
            run = variants[name]
            start = time.perf_counter()
            run()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ratios(t: dict[str, float], suffix: str) -> dict[str, float]:
    router = t["router" + suffix]
    return {
        "cmoe_soft_over_parts": t["cmoe_soft" + suffix] / (t["experts_all"] + router),
        "cmoe_sparse_over_parts": t["cmoe_sparse" + suffix] / (t["experts_top2"] + router),
        "router_share": router / t["cmoe_soft" + suffix],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens per image after concat4")
    parser.add_argument("--in-dim", type=int, default=1408, help="connector input (concat4 of width 352)")
    parser.add_argument("--d-llm", type=int, default=1024)
    parser.add_argument("--task-dim", type=int, default=192)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--small-ratio", type=float, default=0.25, help="router hidden / router input, small")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    t = measure(build_variants(args), args.rounds, args.warmup)
    load_after = os.getloadavg()[0]
    paper = ratios(t, "")
    small = ratios(t, "_small")
    result = {
        **{k: round(v, 3) for k, v in paper.items()},
        "num_experts": args.experts,
        "small_router": {"router_hidden_ratio": args.small_ratio, **{k: round(v, 3) for k, v in small.items()}},
        "targets": TARGETS,
        "times_ms": {k: round(v * 1e3, 1) for k, v in t.items()},
        "shape": {
            "images": args.images,
            "tokens": args.tokens,
            "in_dim": args.in_dim,
            "d_llm": args.d_llm,
            "task_embed_dim": args.task_dim,
            "router_hidden_ratio": 4.0,
            "top_k": 2,
            "threads": args.threads,
            "rounds": args.rounds,
        },
        # 1-minute load average before / after: the machine may be shared, and every CPU op is a
        # parallel region that waits for its slowest thread
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"CMoE E={args.experts}, {args.images}x{args.tokens} tokens, in {args.in_dim} -> d {args.d_llm}, "
        f"forward+backward medians of {args.rounds} rounds, {args.threads} threads, "
        f"load average {result['load_average'][0]} -> {result['load_average'][1]}"
    )
    for name, ms in result["times_ms"].items():
        print(f"  {name:<18} {ms:9.1f} ms")
    for label, figures in (("paper router (x4)", paper), (f"small router (x{args.small_ratio})", small)):
        print(f"{label}:")
        for key, value in figures.items():
            target = TARGETS.get(key)
            verdict = "" if target is None else f"  (target <= {target:.2f}: {'ok' if value <= target else 'MISSED'})"
            print(f"  {key:<24} {value:.3f}{verdict}")


if __name__ == "__main__":
    main()
