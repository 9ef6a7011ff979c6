"""MoE feed-forward speed and memory, forward + backward, side by side in one run.

    (a) ours, top-1 of 4 experts plus the meta expert (Med-MoE)  vs  a dense gated FFN with the same
        active parameters: top-1 expert + meta = two FFNs of width F per token -> one FFN of width 2F
    (b) ours, top-2 of 8 (renormalised)  vs  transformers' MixtralSparseMoeBlock with the same weights
        (its default eager experts loop; its grouped_mm implementation is reported too)
    (c) ours, top-2 of 8  vs  a naive MoE that runs every expert on every token and weights the outputs

(a) is also reported with the experts forced onto torch's grouped matmul (``grouped_mm="always"``; the
default ``"auto"`` uses the per-expert loop on CPU), same weights, as ``moe_over_dense_grouped_mm``.

Threads: every kernel is a barrier of the intra-op thread pool. The MoE layer runs ~4x the dense FFN's
kernels (router, sort, gather/scatter, per-expert matmuls, meta expert); on a machine whose cores are
busy with other work, a descheduled second thread stalls every barrier, so at 2 threads on a loaded
2-core machine the ratio measures contention more than compute (see ``load_average``); compare
with ``--threads 1``.

Timing: each variant does one forward + backward (input and parameter grads) per call. After warm-up, every
round runs the two variants of each comparison back to back, in alternating order between rounds, so drift
on a shared machine hits both; a ratio is the median over rounds of the paired time ratios, the ms figures
are per-variant medians. Memory: one more call per variant under ``torch.profiler`` with
``profile_memory=True``; the peak of the running sum of the CPU allocator's [memory] events (allocations
minus frees, bytes) during the call, i.e. the peak of tensors created by that forward + backward on top of
what was live before (weights and input are not counted; activations and grads are).

Each ratio is also reported with its spread over the rounds (``ratios``: median, min, max, quartiles), with the
load average at start and end (``load_average``); ``--reduced`` is a seconds-long run on tiny shapes (tests).

    python benchmarks/moe.py [--tokens 4096] [--hidden 256] [--ffn 688] [--rounds 15] [--threads 1] [--json]
        [--out FILE] [--reduced]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402 (after sys.path)

from lightningmodules.models.moe import MoEContext, MoEFeedForward, attach_context  # noqa: E402


def dense_ffn(hidden: int, ffn: int) -> nn.Module:
    """A Llama-style gated FFN (transformers' LlamaMLP)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, hidden_act="silu"))


def mixtral_block(hidden: int, ffn: int, num_experts: int, top_k: int, implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.normal_(std=hidden**-0.5)
        block.experts.gate_up_proj.normal_(std=hidden**-0.5)
        block.experts.down_proj.normal_(std=ffn**-0.5)
    return block


def ours_like_mixtral(block: nn.Module) -> MoEFeedForward:
    """Our layer with the Mixtral block's weights: router bias 0, renormalised top-k."""
    experts = block.experts
    ours = MoEFeedForward.build(
        hidden_size=experts.hidden_dim,
        ffn_size=experts.intermediate_dim,
        num_experts=experts.num_experts,
        top_k=block.top_k,
        gated=True,
        bias=False,
        activation="silu",
        renormalize=True,
    )
    with torch.no_grad():
        ours.router.linear.weight.copy_(block.gate.weight)  # (E, D)
        ours.router.linear.bias.zero_()
        ours.experts.w_in.copy_(experts.gate_up_proj.transpose(1, 2))  # (E, 2F, D) -> (E, D, 2F)
        ours.experts.w_out.copy_(experts.down_proj.transpose(1, 2))  # (E, D, F) -> (E, F, D)
    return ours


class NaiveMoE(nn.Module):
    """Every expert on every token, outputs weighted by the (sparse) combine weights: the cost baseline."""

    def __init__(self, moe: MoEFeedForward) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, D)
        routing = self.moe.router(x)
        dense_weights = torch.zeros_like(routing.probs).scatter(1, routing.indices, routing.weights)  # (N, E)
        out = torch.zeros_like(x)  # (N, D)
        for e in range(self.moe.num_experts):
            out = out + dense_weights[:, e : e + 1].to(x.dtype) * self.moe.experts.expert_forward(e, x)
        return out.view(hidden_states.shape)


def train_step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x`` (which needs grad), parameter grads reset first."""

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).backward(upstream)

    return step


@contextmanager
def _stdout_to_stderr():
    """The profiler backend may write status lines to fd 1; keep stdout clean for --json."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def peak_mb(step: Callable[[], None]) -> float:
    """Peak net CPU allocation (MB) during one call, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with _stdout_to_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20


COMPARISONS = (  # (key, ours, reference)
    ("moe_over_dense", "moe_top1of4_meta", "dense_same_active"),
    ("moe_over_dense_grouped_mm", "moe_top1of4_meta_grouped_mm", "dense_same_active"),
    ("ours_over_hf_mixtral", "ours_top2of8", "hf_mixtral_eager"),
    ("ours_over_hf_mixtral_grouped_mm", "ours_top2of8", "hf_mixtral_grouped_mm"),
    ("ours_over_naive", "ours_top2of8", "naive_top2of8"),
)


def time_pairs(
    steps: dict[str, Callable[[], None]], *, rounds: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, each comparison's two variants back to back (order alternating between rounds).

    Returns each comparison's time ratio per round, and each variant's seconds per round.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    ratios: dict[str, list[float]] = {key: [] for key, _, _ in COMPARISONS}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for key, ours, reference in COMPARISONS:
            pair = (ours, reference) if r % 2 == 0 else (reference, ours)
            took = {}
            for name in pair:
                start = time.perf_counter()
                steps[name]()
                took[name] = time.perf_counter() - start
                seconds[name].append(took[name])
            ratios[key].append(took[ours] / took[reference])
    return ratios, seconds


def main() -> None:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.reduced:
        args.tokens, args.hidden, args.ffn, args.warmup = 128, 32, 64, 1
        args.rounds = args.rounds or 2
    args.rounds = args.rounds or 15
    args.threads = args.threads or 1
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = common.load_average()
    d, f, n = args.hidden, args.ffn, args.tokens

    # (a) Med-MoE layer vs a dense FFN of the same active width
    meta = dense_ffn(d, f)
    med_moe_settings = dict(
        hidden_size=d, ffn_size=f, num_experts=4, top_k=1, gated=True, activation="silu", meta_expert=meta
    )
    med_moe = MoEFeedForward.build(**med_moe_settings, renormalize=False)
    med_moe_grouped = MoEFeedForward.build(**med_moe_settings, renormalize=False, grouped_mm="always")
    med_moe_grouped.load_state_dict(med_moe.state_dict())
    dense_same_active = dense_ffn(d, 2 * f)
    # (b), (c) top-2 of 8 with the same weights
    hf_eager = mixtral_block(d, f, 8, 2, "eager")
    hf_grouped = mixtral_block(d, f, 8, 2, "grouped_mm")
    hf_grouped.load_state_dict(hf_eager.state_dict())
    ours_top2 = ours_like_mixtral(hf_eager)
    naive_top2 = NaiveMoE(ours_like_mixtral(hf_eager))

    x = torch.randn(1, n, d, requires_grad=True)  # (B, T, D), one sequence of n tokens
    upstream = torch.randn(1, n, d)
    with torch.no_grad():
        diff_hf = float((ours_top2(x) - hf_eager(x)).abs().max())
        diff_naive = float((ours_top2(x) - naive_top2(x)).abs().max())
    # as in training, our layers run in a step context and record aux losses and statistics into it
    context = MoEContext()
    for module in (med_moe, med_moe_grouped, ours_top2):
        attach_context(module, context)
    med_moe(x)
    top1_load = context.stats[med_moe].routed_counts.tolist()
    ours_top2(x)
    top2_load = context.stats[ours_top2].routed_counts.tolist()

    modules = {
        "moe_top1of4_meta": med_moe,
        "moe_top1of4_meta_grouped_mm": med_moe_grouped,
        "dense_same_active": dense_same_active,
        "ours_top2of8": ours_top2,
        "hf_mixtral_eager": hf_eager,
        "hf_mixtral_grouped_mm": hf_grouped,
        "naive_top2of8": naive_top2,
    }
    steps = {name: train_step(module, x, upstream) for name, module in modules.items()}
    load_before = os.getloadavg()[0]
    per_round, per_round_seconds = time_pairs(steps, rounds=args.rounds, warmup=args.warmup)
    ratios = {key: statistics.median(values) for key, values in per_round.items()}
    seconds = {name: statistics.median(values) for name, values in per_round_seconds.items()}
    memory = {name: peak_mb(step) for name, step in steps.items()}

    result = {
        **common.header("moe", args, load_start),
        **ratios,
        "ratios": {key: common.spread(values) for key, values in per_round.items()},
        "baselines": {
            "moe_over_dense": "dense gated FFN (transformers LlamaMLP) of the same active width 2F",
            "ours_over_hf_mixtral": "transformers MixtralSparseMoeBlock, same weights, eager experts loop",
            "ours_over_naive": "every expert on every token, sparse combine weights",
        },
        **{f"ms_{name}": 1000 * s for name, s in seconds.items()},
        **{f"peak_mb_{name}": mb for name, mb in memory.items()},
        "max_abs_diff_ours_vs_hf": diff_hf,
        "max_abs_diff_ours_vs_naive": diff_naive,
        "expert_tokens_top1of4": top1_load,
        "expert_assignments_top2of8": top2_load,
        "tokens": n,
        "hidden": d,
        "ffn": f,
        "dense_ffn": 2 * f,
        "torch": torch.__version__,
        "memory_method": "torch.profiler profile_memory: peak net CPU allocation per call",
    }
    common.emit(result, args, lambda res: text_lines(res, args, modules, seconds, memory, load_before))


def text_lines(result, args, modules, seconds, memory, load_before) -> list[str]:
    d, f, n = args.hidden, args.ffn, args.tokens
    diff_hf, diff_naive = result["max_abs_diff_ours_vs_hf"], result["max_abs_diff_ours_vs_naive"]
    top1_load, top2_load = result["expert_tokens_top1of4"], result["expert_assignments_top2of8"]
    spread = result["ratios"]
    out = [
        f"forward+backward, {n} tokens, d {d}, ffn {f}, {args.threads} threads, median of {args.rounds} rounds, "
        f"1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    ]
    for name in modules:
        out.append(f"  {name:24s} {1000 * seconds[name]:8.1f} ms   peak {memory[name]:7.1f} MB")
    out.append(
        f"(a) top-1 of 4 + meta / dense FFN width {2 * f}: {common.fmt(spread['moe_over_dense'])}  (target <= 1.15); "
        f"experts on grouped_mm: {common.fmt(spread['moe_over_dense_grouped_mm'])}"
    )
    out.append(
        f"(b) ours / transformers Mixtral block (eager): {common.fmt(spread['ours_over_hf_mixtral'])}  "
        f"(target <= 0.95); vs its grouped_mm experts: {common.fmt(spread['ours_over_hf_mixtral_grouped_mm'])}"
    )
    out.append(f"(c) ours / compute-every-expert: {common.fmt(spread['ours_over_naive'])}")
    out.append(
        f"outputs: max |ours - HF| {diff_hf:.2e}, max |ours - naive| {diff_naive:.2e}; "
        f"load top-1 of 4 {top1_load}, top-2 of 8 {top2_load}"
    )
    return out


if __name__ == "__main__":
    main()
