"""LLM mixture-of-experts machinery: router, grouped experts, MoE feed-forward layer, upcycling, counting.

router.py    TopKRouter (Linear with bias, top-k, softmax combine weights) -> RouterOutput
dispatch.py  plan_dispatch: sort-based, dropless (or Capacity-limited) grouping of tokens by expert
experts.py   GroupedExperts: stacked gated / ungated FFN experts (any width, bias, activation): routed
             (grouped_mm or per-expert loop) or dense mixing (mix_dense)
losses.py    load_balancing_loss (Switch), router_z_loss, padding masked out
layer.py     MoEFeedForward = router + experts (+ meta expert), drop-in for a decoder layer's mlp
stats.py     MoEStats, RoutingRecord (one type for the LLM layers and the connector), expert_load_by_group
context.py   MoEContext (one step: padding mask in, aux losses / stats / routing out), attach_context
upcycle.py   inspect_ffn, upcycle_ffn, moe_from_ffns, convert_to_moe, convert_from_sources
params.py    count_parameters (total and active per token)
"""

from .context import MoEContext, UsesMoEContext, attach_context, context_users, moe_context
from .dispatch import DROP_POLICIES, Capacity, DispatchPlan, expert_capacity, plan_dispatch
from .experts import GroupedExperts, grouped_mm_available
from .layer import MoEFeedForward, moe_layers
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
    "DROP_POLICIES",
    "Capacity",
    "DispatchPlan",
    "FFNSpec",
    "GroupedExperts",
    "MoEContext",
    "MoEFeedForward",
    "MoEStats",
    "RouterOutput",
    "RoutingRecord",
    "TopKRouter",
    "UsesMoEContext",
    "attach_context",
    "context_users",
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
    "moe_context",
    "moe_from_ffns",
    "moe_layers",
    "plan_dispatch",
    "router_z_loss",
    "select_layers",
    "upcycle_ffn",
]
