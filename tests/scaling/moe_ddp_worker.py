"""MoE layer under DDP when one rank's tokens never reach an expert (run by torchrun, 2 ranks, gloo).

    torchrun --nproc_per_node=2 tests/scaling/moe_ddp_worker.py OUT.json

Routing is forced through the router weights: a token whose largest feature is d goes to expert d.
Rank 0's tokens reach experts 0 and 1, rank 1's only expert 1, expert 2 gets no token anywhere, and
in step 2 half of rank 1's tokens are padding. DDP runs with
``find_unused_parameters=False`` (Lightning's ``ddp``). Each rank also trains a plain copy on both
ranks' data (loss = mean of the two ranks' losses, what DDP's gradient averaging computes) and
records the largest gradient and weight difference, and which experts got a non-zero gradient.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightningmodules.models.moe import MoEContext, MoEFeedForward, attach_context
from pipeline.strategies import shutdown_distributed

D, E = 6, 3


class TinyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = MoEFeedForward.build(hidden_size=D, ffn_size=8, num_experts=E, top_k=1, gated=True)
        self.head = nn.Linear(D, 1)
        with torch.no_grad():
            self.moe.router.linear.weight.zero_()
            self.moe.router.linear.weight[:, :E] = 20.0 * torch.eye(E)  # (E, D): feature d -> expert d
            self.moe.router.linear.bias.zero_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.context = MoEContext(mask)  # (B, T) bool or None; kept for the step's statistics
        attach_context(self, self.context)
        y = self.moe(x)  # (B, T, D)
        return self.head(y).squeeze(-1)  # (B, T)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (2, 4, D), target (2, 4), mask (2, 4)) for a rank and step, the same on every process."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.rand(2, 4, D, generator=g) * 0.1  # (B, T, D)
    experts = [0, 1] if rank == 0 else [1]
    for i in range(8):
        x.view(8, D)[i, experts[i % len(experts)]] += 1.0  # token i -> that expert
    target = torch.randn(2, 4, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    if rank == 1 and step == 1:
        mask[1] = False  # the second sequence is padding only
    return x, target, mask


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pred = model(x, mask)  # (B, T)
    err = (pred - target) ** 2 * mask  # (B, T)
    return err.sum() / mask.sum().clamp(min=1)


def main() -> int:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a missing gradient fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyMoE()
    reference = TinyMoE()
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    report: dict = {"rank": rank, "steps": []}
    for step in range(3):
        opt.zero_grad()
        loss_of(ddp, *batch(rank, step)).backward()
        ref_opt.zero_grad()
        (sum(loss_of(reference, *batch(r, step)) for r in range(world)) / world).backward()
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        ref_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in reference.named_parameters()}
        w_in = grads["moe.experts.w_in"]  # (E, D, 2F)
        report["steps"].append(
            {
                "grad_max_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
                "expert_grad_norms": [w_in[e].norm().item() for e in range(E)],
                "local_routed": model.context.stats[model.moe].routed_counts.tolist(),
            }
        )
        opt.step()
        ref_opt.step()
    report["weight_max_diff"] = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(gathered, indent=1))
    # Release DDP (its reducer holds the gloo group) before destroying the group, so destroy_process_group drops
    # the group's last reference. Destroyed the other way round (the reducer freeing the group after
    # destroy_process_group), about 1 run in 8 aborted at exit: "terminate called without an active exception".
    del ddp, opt
    shutdown_distributed()  # gc.collect(), then destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
