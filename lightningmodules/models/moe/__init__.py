"""LLM mixture-of-experts machinery: router, grouped experts, MoE feed-forward layer, upcycling, counting.

router.py    TopKRouter (Linear with bias, top-k, softmax combine weights) -> RouterOutput
dispatch.py  plan_dispatch: sort-based, dropless (or capacity-limited) grouping of tokens by expert
experts.py   GroupedExperts: stacked gated / ungated FFN experts, one matmul per expert and projection
losses.py    load_balancing_loss (Switch), router_z_loss, padding masked out
layer.py     MoEFeedForward = router + experts (+ meta expert), drop-in for a decoder layer's mlp
stats.py     MoEStats, RoutingRecord, expert_load_by_group
context.py   set_token_mask / token_mask / clear_token_mask, collect_aux_loss, collect_stats
upcycle.py   inspect_ffn, upcycle_ffn, moe_from_ffns, convert_to_moe, convert_from_sources
params.py    count_parameters (total and active per token)
"""

from .context import clear_token_mask, collect_aux_loss, collect_stats, moe_layers, set_token_mask, token_mask
from .dispatch import DispatchPlan, expert_capacity, plan_dispatch
from .experts import GroupedExperts, grouped_mm_available
from .layer import MoEFeedForward
from .losses import load_balancing_loss, router_z_loss
from .params import count_parameters
from .router import RouterOutput, TopKRouter
from .stats import MoEStats, RoutingRecord, expert_load_by_group
from .upcycle import (
    FFNSpec,
    convert_from_sources,
    convert_to_moe,
    decoder_layers,
    experts_from_ffns,
    inspect_ffn,
    moe_from_ffns,
    select_layers,
    upcycle_ffn,
)

__all__ = [
    "DispatchPlan",
    "FFNSpec",
    "GroupedExperts",
    "MoEFeedForward",
    "MoEStats",
    "RouterOutput",
    "RoutingRecord",
    "TopKRouter",
    "clear_token_mask",
    "collect_aux_loss",
    "collect_stats",
    "convert_from_sources",
    "convert_to_moe",
    "count_parameters",
    "decoder_layers",
    "expert_capacity",
    "expert_load_by_group",
    "experts_from_ffns",
    "grouped_mm_available",
    "inspect_ffn",
    "load_balancing_loss",
    "moe_from_ffns",
    "moe_layers",
    "plan_dispatch",
    "router_z_loss",
    "select_layers",
    "set_token_mask",
    "token_mask",
    "upcycle_ffn",
]
