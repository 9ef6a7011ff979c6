"""CMoE overhead: the connector's forward+backward time over the same arithmetic written with plain modules.

The baseline (``PlainCMoE``) is what one would write by hand from the paper, with ordinary ``nn`` modules and
the connector's weights copied in, so both sides compute the same function on the same weights:

- router: ``nn.Embedding`` task embedding, ``fc1`` split into its token and task column blocks (the task half
  ``fc1_task(embedding(task))`` computed once per image and broadcast over its tokens, as the CMoE does),
  GELU, ``fc2`` -> logits per token;
- soft: ``sigmoid`` normalised to sum 1, every expert (``nn.Sequential(Linear, GELU, Linear)``) on every
  token, outputs weighted and summed;
- sparse top-k: ``topk`` + softmax over the kept logits, then per expert the rows routed to it
  (``torch.where``), gathered, run, weighted and ``index_add``-ed back (transformers' Mixtral eager loop).

So the ratio is overhead only (stacked weights, dispatch plan, ``MoEContext`` records; the CMoE runs with a
context attached, as in training). Both sides' FLOPs are counted over one forward+backward with the formulas of
``torch.utils.flop_counter`` (matmuls: mm / addmm / bmm / baddbmm; elementwise ops are not counted) and must
agree within 1%. They differ by the soft CMoE's weighted bias sum ``weights @ b_out``, a counted matmul of
2 x tokens x E x d, where the plain side adds and weights each expert's bias elementwise (the same multiply-adds,
uncounted): 0.04% at the default shapes. Outputs must agree to 1e-4 and the sparse routing exactly, else the
benchmark fails before it reports.

Shapes are Uni-Med's scaled down by 4 in every width: concat4 input 1408 (paper 5632), d_llm 1024 (4096),
task embedding 192 (768), E = 5, 16 images x 64 visual tokens. Pairs: soft and sparse (top-2), each with the
paper's router (hidden = 4 x router input) and a small one (``--small-ratio``).

    python benchmarks/connector.py [--rounds 9] [--threads 1] [--json] [--out FILE] [--reduced]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402 (after sys.path)

from lightningmodules.models.cmoe import CMoEConnector  # noqa: E402
from lightningmodules.models.moe import MoEContext, attach_context  # noqa: E402

TARGETS = {"soft": 1.10, "sparse": 1.30}  # CMoE time / plain-module time, paper router
FLOP_TOLERANCE = 0.01


class PlainRouter(nn.Module):
    """The CMoE router's arithmetic with plain modules (task half once per image)."""

    def __init__(self, cmoe: CMoEConnector) -> None:
        super().__init__()
        source = cmoe.router
        self.task_embedding = nn.Embedding.from_pretrained(source.task_embedding.weight.detach().clone(), freeze=False)
        self.fc1_token = nn.Linear(source.fc1_token.in_features, source.fc1_token.out_features)
        self.fc1_task = nn.Linear(source.fc1_task.in_features, source.fc1_task.out_features, bias=False)
        self.fc2 = nn.Linear(source.fc2.in_features, source.fc2.out_features)
        self.load_state_dict(
            {k: v for k, v in source.state_dict().items() if k.split(".")[0] in ("fc1_token", "fc1_task", "fc2")},
            strict=False,
        )

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """(N, P, in), (N,) -> logits (N*P, E)."""
        n, p, _ = features.shape
        task_part = self.fc1_task(self.task_embedding(task_ids))  # (N, H) once per image
        hidden = self.fc1_token(features) + task_part.unsqueeze(1)  # (N, P, H)
        return self.fc2(F.gelu(hidden)).reshape(n * p, -1)  # (N*P, E)


class PlainCMoE(nn.Module):
    """Router + ``nn.Sequential`` experts with the connector's weights; soft or sparse top-k weighting."""

    def __init__(self, cmoe: CMoEConnector) -> None:
        super().__init__()
        self.weighting, self.top_k = cmoe.weighting, cmoe.top_k
        self.router = PlainRouter(cmoe)
        grouped = cmoe.experts
        self.experts = nn.ModuleList()
        with torch.no_grad():
            for e in range(grouped.num_experts):
                expert = nn.Sequential(
                    nn.Linear(grouped.hidden_size, grouped.ffn_size),
                    nn.GELU(),
                    nn.Linear(grouped.ffn_size, grouped.out_size),
                )
                expert[0].weight.copy_(grouped.w_in[e].t())  # (in, d) matmul layout -> (d, in)
                expert[0].bias.copy_(grouped.b_in[e])
                expert[2].weight.copy_(grouped.w_out[e].t())
                expert[2].bias.copy_(grouped.b_out[e])
                self.experts.append(expert)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        n, p, d_in = features.shape
        x = features.reshape(n * p, d_in)  # (N*P, in)
        logits = self.router(features, task_ids)  # (N*P, E)
        if self.weighting == "soft":
            scores = torch.sigmoid(logits)
            weights = scores / scores.sum(dim=-1, keepdim=True)  # (N*P, E)
            out = sum(weights[:, e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        else:
            top_logits, top_experts = logits.topk(self.top_k, dim=-1)  # (N*P, k)
            gates = torch.softmax(top_logits, dim=-1)  # (N*P, k)
            out = x.new_zeros(n * p, self.experts[0][2].out_features)
            for e, expert in enumerate(self.experts):
                rows, slot = torch.where(top_experts == e)  # (n_e,), (n_e,)
                if rows.numel():
                    out = out.index_add(0, rows, expert(x[rows]) * gates[rows, slot].unsqueeze(1))
        return out.reshape(n, p, -1)  # (N, P, d)

    def routing(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.router(features, task_ids).topk(self.top_k, dim=-1).indices


def train_step(module: nn.Module, features: torch.Tensor, task_ids: torch.Tensor, grad: torch.Tensor) -> Callable:
    """One forward+backward with a fixed output gradient; features come from a frozen tower (no grad)."""
    params = list(module.parameters())

    def run() -> None:
        for p in params:
            p.grad = None
        module(features, task_ids=task_ids).backward(grad)

    return run


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (a forward+backward)."""
    with common.MatmulFlops() as counter:
        step()
    return counter.total


def build_pairs(args) -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    n, p = args.images, args.tokens
    features = torch.randn(n, p, args.in_dim, generator=g)  # (N, P, in)
    task_ids = torch.randint(0, 6, (n,), generator=g)  # (N,)
    out_grad = torch.randn(n, p, args.d_llm, generator=g)  # (N, P, d)
    pairs = {}
    for weighting in ("soft", "sparse"):
        for label, ratio in (("", 4.0), ("_small_router", args.small_ratio)):
            torch.manual_seed(0)
            cmoe = CMoEConnector(
                in_dim=args.in_dim,
                out_dim=args.d_llm,
                num_experts=args.experts,
                weighting=weighting,
                top_k=args.top_k,
                router_hidden_ratio=ratio,
                task_embed_dim=args.task_dim,
            )
            plain = PlainCMoE(cmoe)
            with torch.no_grad():
                diff = float((cmoe(features, task_ids=task_ids) - plain(features, task_ids)).abs().max())
                same_routing = True
                if weighting == "sparse":
                    ours = cmoe.route(features, task_ids).indices
                    same_routing = torch.equal(ours, plain.routing(features, task_ids))
            attach_context(cmoe, MoEContext())  # as in training: the connector records its routing
            steps = {
                "cmoe": train_step(cmoe, features, task_ids, out_grad),
                "plain": train_step(plain, features, task_ids, out_grad),
            }
            cmoe_flops = count_flops(steps["cmoe"])
            plain_flops = count_flops(steps["plain"])
            logit_grad = torch.randn(n * p, args.experts, generator=g)  # (N*P, E)
            router_flops = count_flops(lambda: plain.router(features, task_ids).backward(logit_grad))  # noqa: B023
            pairs[weighting + label] = {
                "steps": steps,
                "flops": {
                    "cmoe": cmoe_flops,
                    "plain": plain_flops,
                    "relative_difference": round(abs(cmoe_flops - plain_flops) / plain_flops, 6),
                    "router_share": round(router_flops / plain_flops, 4),
                },
                "max_abs_output_diff": diff,
                "same_routing": same_routing,
                "router_hidden_ratio": ratio,
            }
    return pairs


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="visual tokens per image after concat4")
    parser.add_argument("--in-dim", type=int, default=1408, help="connector input (concat4 of width 352)")
    parser.add_argument("--d-llm", type=int, default=1024)
    parser.add_argument("--task-dim", type=int, default=192)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--small-ratio", type=float, default=0.25, help="router hidden / router input, small")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.reduced:
        args.images, args.tokens, args.in_dim, args.d_llm, args.task_dim = 2, 8, 256, 128, 16
        args.rounds, args.warmup = args.rounds or 2, 0
    args.rounds = args.rounds or 9
    args.threads = args.threads or 1
    torch.set_num_threads(args.threads)
    result = common.header("connector", args, common.load_average())

    pairs = build_pairs(args)
    for name, pair in pairs.items():
        flops = pair["flops"]
        if flops["relative_difference"] > FLOP_TOLERANCE:
            raise SystemExit(f"{name}: CMoE and plain FLOPs differ by {flops['relative_difference']:.2%}: {flops}")
        if pair["max_abs_output_diff"] > 1e-4 or not pair["same_routing"]:
            raise SystemExit(f"{name}: outputs differ ({pair['max_abs_output_diff']:.2e}) or routing differs")
    # every round: every pair, each pair's two sides back to back in alternating order; pair order rotates
    times: dict[str, dict[str, list[float]]] = {name: {"cmoe": [], "plain": []} for name in pairs}
    for r in range(args.warmup + args.rounds):
        for name in common.round_order(list(pairs), r):
            steps = pairs[name]["steps"]
            for side in ("cmoe", "plain") if r % 2 == 0 else ("plain", "cmoe"):
                start = time.perf_counter()
                steps[side]()
                if r >= args.warmup:
                    times[name][side].append(time.perf_counter() - start)
    ratio = {name: common.spread(common.ratios(t["cmoe"], t["plain"])) for name, t in times.items()}
    result.update(
        {
            "baseline": (
                "PlainCMoE: the same router inputs (task half once per image), weighting and experts as plain "
                "nn modules with the CMoE's weights; sparse: per-expert torch.where + index_add loop"
            ),
            "cmoe_soft_over_plain": ratio["soft"]["median"],
            "cmoe_sparse_over_plain": ratio["sparse"]["median"],
            "ratios": ratio,
            "ms": {
                f"{side}_{name}": common.spread([1e3 * s for s in t[side]], 2)
                for name, t in times.items()
                for side in ("cmoe", "plain")
            },
            "flops": {name: pair["flops"] for name, pair in pairs.items()},
            "flops_equal": all(p["flops"]["relative_difference"] <= FLOP_TOLERANCE for p in pairs.values()),
            "flop_tolerance": FLOP_TOLERANCE,
            "flop_method": "torch.utils.flop_counter.FlopCounterMode, one forward+backward; matmul FLOPs only",
            "max_abs_output_diff": {name: pair["max_abs_output_diff"] for name, pair in pairs.items()},
            "same_routing": all(p["same_routing"] for p in pairs.values()),
            "context_attached": True,
            "targets": TARGETS,
            "shape": {
                "images": args.images,
                "tokens": args.tokens,
                "in_dim": args.in_dim,
                "d_llm": args.d_llm,
                "task_embed_dim": args.task_dim,
                "experts": args.experts,
                "top_k": args.top_k,
                "router_hidden_ratio": 4.0,
                "small_router_hidden_ratio": args.small_ratio,
            },
        }
    )

    def lines(res: dict) -> list[str]:
        out = [
            f"CMoE vs the same arithmetic in plain modules, E={args.experts}, {args.images}x{args.tokens} tokens, "
            f"in {args.in_dim} -> d {args.d_llm}, forward+backward, {args.rounds} rounds, {args.threads} threads"
        ]
        for name in pairs:
            f = res["flops"][name]
            target = TARGETS.get(name)
            verdict = "" if target is None else f"  (target <= {target:.2f})"
            out.append(
                f"  {name:<20} cmoe/plain {common.fmt(res['ratios'][name])}{verdict}; "
                f"cmoe {res['ms']['cmoe_' + name]['median']:.1f} ms, "
                f"plain {res['ms']['plain_' + name]['median']:.1f} ms; "
                f"GFLOP {f['cmoe'] / 1e9:.3f} vs {f['plain'] / 1e9:.3f}, router share {f['router_share']:.2f}"
            )
        return out

    common.emit(result, args, lines)


if __name__ == "__main__":
    main()
