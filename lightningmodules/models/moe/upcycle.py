"""Sparse upcycling: turn the dense FFNs of an HF causal LM into ``MoEFeedForward`` layers.

The FFN of decoder layer i is found generically as ``llm.get_decoder().layers[i].mlp``; its form is read
from its child Linears (no per-family code): gated ``gate_proj/up_proj/down_proj`` (Llama, Qwen2,
Mistral, StableLM), ``w1/w3/w2`` (Mixtral naming), fused ``gate_up_proj/down_proj`` (Phi-3, GLM);
ungated ``fc1/fc2`` (Phi), ``c_fc/c_proj``, ``dense_h_to_4h/dense_4h_to_h``, ``up_proj/down_proj``, or any two
Linears D->F->D. The activation is the one the module applies (its ``act_fn`` / ``activation_fn``), named
by matching it against transformers' registry, with ``config.hidden_act`` tried first.

Layer choice: ``"every_other"`` is layers 0, 2, 4, ... as Med-MoE / MoE-LLaVA's ``moe_mode="sparse"``
(``list(range(num_layers))[::2]``); ``"all"`` is every layer (MedPLIB stage IV); or a list of indices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .dispatch import Capacity
from .experts import GroupedExperts, GroupedMM
from .layer import MoEFeedForward
from .router import TopKRouter

LayerSelection = Literal["every_other", "all"] | Sequence[int]
RouterInit = nn.Linear | Mapping[int, nn.Linear] | None

# (kind, gate, up/in, down/out): checked in order; "gated" = separate gate and up, "fused" = [gate | up] in one
# Linear, "plain" = in -> act -> out.
_LAYOUTS: tuple[tuple[str, str | None, str, str], ...] = (
    ("gated", "gate_proj", "up_proj", "down_proj"),
    ("gated", "w1", "w3", "w2"),
    ("fused", None, "gate_up_proj", "down_proj"),
    ("plain", None, "fc1", "fc2"),
    ("plain", None, "c_fc", "c_proj"),
    ("plain", None, "dense_h_to_4h", "dense_4h_to_h"),
    ("plain", None, "up_proj", "down_proj"),
    ("plain", None, "w1", "w2"),
)
_ACTIVATION_ATTRS = ("act_fn", "activation_fn", "act", "activation")


@dataclass(frozen=True)
class FFNSpec:
    """The form of a dense FFN module, enough to copy it into ``GroupedExperts``."""

    kind: str  # "gated" | "fused" | "plain"
    gate_name: str | None
    in_name: str  # up_proj / gate_up_proj / fc1 ...
    out_name: str  # down_proj / fc2 ...
    hidden_size: int
    ffn_size: int
    bias: bool
    activation: str

    @property
    def gated(self) -> bool:
        return self.kind in ("gated", "fused")


def _linear_children(mlp: nn.Module) -> dict[str, nn.Module]:
    return {name: child for name, child in mlp.named_children() if isinstance(child, nn.Linear)}


def _activation_name(mlp: nn.Module, hidden_act: str | None) -> str:
    """Name (in transformers' ACT2FN) of the activation ``mlp`` applies."""
    from transformers.activations import ACT2CLS, ACT2FN

    module = next((getattr(mlp, a) for a in _ACTIVATION_ATTRS if isinstance(getattr(mlp, a, None), nn.Module)), None)
    config_act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    candidates = [n for n in (hidden_act, config_act) if isinstance(n, str) and n in ACT2FN]
    if module is None:
        if candidates:
            return candidates[0]
        raise ValueError(
            f"{type(mlp).__name__}: no activation module ({'/'.join(_ACTIVATION_ATTRS)}) and no hidden_act given"
        )
    probe = torch.linspace(-6.0, 6.0, 241, device="cpu")  # on CPU even under a meta-device context
    with torch.no_grad():
        expected = module(probe)
        for name in candidates + [n for n in ACT2CLS if n not in candidates]:
            entry = ACT2CLS[name]
            if (entry[0] if isinstance(entry, tuple) else entry) is not type(module):
                continue
            if torch.allclose(ACT2FN[name](probe), expected, atol=1e-6):
                return name
    raise ValueError(f"{type(mlp).__name__}: activation {module!r} is not one of transformers' ACT2FN activations")


def inspect_ffn(mlp: nn.Module, *, hidden_act: str | None = None) -> FFNSpec:
    """Detect whether ``mlp`` is gated or not, its sizes, bias and activation, from its child Linears."""
    linears = _linear_children(mlp)
    others = [n for n, c in mlp.named_children() if n not in linears and any(True for _ in c.parameters())]
    if others:
        raise ValueError(
            f"{type(mlp).__name__}: children {others} have parameters but are not nn.Linear "
            f"(merge LoRA adapters into the weights before upcycling)"
        )
    for kind, gate_name, in_name, out_name in _LAYOUTS:  # noqa: B007 (kind is read after the loop)
        names = [n for n in (gate_name, in_name, out_name) if n is not None]
        if all(n in linears for n in names) and len(linears) == len(names):
            break
    else:
        if len(linears) != 2:
            raise ValueError(
                f"{type(mlp).__name__}: cannot tell gated from ungated FFN from its Linear children {sorted(linears)}"
            )
        first, second = linears  # ungated fallback: D -> F then F -> D, by shape
        if linears[first].in_features != linears[second].out_features:
            first, second = second, first
        kind, gate_name, in_name, out_name = "plain", None, first, second
    proj_in, proj_out = linears[in_name], linears[out_name]
    hidden, ffn = proj_out.out_features, proj_out.in_features
    expected_in = 2 * ffn if kind == "fused" else ffn
    if proj_in.in_features != hidden or proj_in.out_features != expected_in:
        raise ValueError(
            f"{type(mlp).__name__}: {in_name} is {proj_in.in_features}->{proj_in.out_features}, "
            f"expected {hidden}->{expected_in} for a {kind} FFN"
        )
    biases = {proj_in.bias is not None, proj_out.bias is not None}
    if gate_name is not None:
        gate = linears[gate_name]
        if (gate.in_features, gate.out_features) != (hidden, ffn):
            raise ValueError(
                f"{type(mlp).__name__}: {gate_name} is {gate.in_features}->{gate.out_features}, "
                f"expected {hidden}->{ffn}"
            )
        biases.add(gate.bias is not None)
    if len(biases) != 1:
        raise ValueError(f"{type(mlp).__name__}: some projections have a bias and some do not")
    return FFNSpec(
        kind=kind,
        gate_name=gate_name,
        in_name=in_name,
        out_name=out_name,
        hidden_size=hidden,
        ffn_size=ffn,
        bias=biases.pop(),
        activation=_activation_name(mlp, hidden_act),
    )


def ffn_weights(mlp: nn.Module, spec: FFNSpec) -> dict[str, torch.Tensor | None]:
    """The FFN's weights in ``GroupedExperts`` layout: w_in (D, 2F|F) as [gate | up], w_out (F, D), biases."""
    proj_in, proj_out = getattr(mlp, spec.in_name), getattr(mlp, spec.out_name)
    w_in, b_in = proj_in.weight.t(), proj_in.bias  # (D, 2F|F), (2F|F,)
    if spec.kind == "gated":
        gate = getattr(mlp, spec.gate_name)
        w_in = torch.cat([gate.weight.t(), w_in], dim=1)  # (D, 2F) [gate | up]
        b_in = None if b_in is None else torch.cat([gate.bias, b_in])  # (2F,)
    return {"w_in": w_in, "w_out": proj_out.weight.t(), "b_in": b_in, "b_out": proj_out.bias}  # w_out (F, D)


def experts_from_ffns(
    ffns: Sequence[nn.Module], *, hidden_act: str | None = None, grouped_mm: GroupedMM = "auto"
) -> GroupedExperts:
    """``GroupedExperts`` whose expert e is a copy of ``ffns[e]`` (all of the same form and size)."""
    specs = [inspect_ffn(f, hidden_act=hidden_act) for f in ffns]
    shape = {(s.gated, s.hidden_size, s.ffn_size, s.bias, s.activation) for s in specs}
    if len(shape) != 1:
        raise ValueError(f"FFNs differ in (gated, hidden, ffn, bias, activation): {sorted(shape)}")
    spec = specs[0]
    reference = getattr(ffns[0], spec.out_name).weight
    experts = GroupedExperts(
        num_experts=len(ffns),
        hidden_size=spec.hidden_size,
        ffn_size=spec.ffn_size,
        gated=spec.gated,
        bias=spec.bias,
        activation=spec.activation,
        grouped_mm=grouped_mm,
    )
    experts.to(device=reference.device, dtype=reference.dtype)
    for index, (ffn, ffn_spec) in enumerate(zip(ffns, specs, strict=True)):
        experts.load_expert(index, **ffn_weights(ffn, ffn_spec))
    return experts


def _router(
    *,
    hidden_size: int,
    num_experts: int,
    top_k: int,
    renormalize: bool,
    jitter: float,
    bias: bool,
    init: nn.Linear | None,
    like: torch.Tensor,
) -> TopKRouter:
    router = TopKRouter(
        hidden_size=hidden_size, num_experts=num_experts, top_k=top_k, renormalize=renormalize, jitter=jitter, bias=bias
    ).to(device=like.device, dtype=like.dtype)
    if init is not None:
        router.init_from_linear(init)
    return router


def moe_from_ffns(
    ffns: Sequence[nn.Module],
    *,
    top_k: int = 1,
    meta: nn.Module | None = None,
    renormalize: bool = False,
    router_init: nn.Linear | None = None,
    jitter: float = 0.0,
    router_bias: bool = True,
    capacity: Capacity | None = None,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    hidden_act: str | None = None,
    grouped_mm: GroupedMM = "auto",
) -> MoEFeedForward:
    """An MoE whose experts are copies of different dense FFNs (MedPLIB stage IV: [grounding, language])."""
    experts = experts_from_ffns(ffns, hidden_act=hidden_act, grouped_mm=grouped_mm)
    router = _router(
        hidden_size=experts.hidden_size,
        num_experts=len(ffns),
        top_k=top_k,
        renormalize=renormalize,
        jitter=jitter,
        bias=router_bias,
        init=router_init,
        like=experts.w_in,
    )
    return MoEFeedForward(
        router=router,
        experts=experts,
        meta_expert=meta,
        capacity=capacity,
        load_balance_coef=load_balance_coef,
        z_loss_coef=z_loss_coef,
    )


def upcycle_ffn(
    mlp: nn.Module,
    *,
    num_experts: int,
    top_k: int = 1,
    meta: bool = True,
    renormalize: bool = False,
    router_init: nn.Linear | None = None,
    jitter: float = 0.0,
    router_bias: bool = True,
    capacity: Capacity | None = None,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    hidden_act: str | None = None,
    grouped_mm: GroupedMM = "auto",
) -> MoEFeedForward:
    """``num_experts`` copies of ``mlp``; with ``meta`` the module ``mlp`` itself becomes the meta expert."""
    return moe_from_ffns(
        [mlp] * num_experts,
        top_k=top_k,
        meta=mlp if meta else None,
        renormalize=renormalize,
        router_init=router_init,
        jitter=jitter,
        router_bias=router_bias,
        capacity=capacity,
        load_balance_coef=load_balance_coef,
        z_loss_coef=z_loss_coef,
        hidden_act=hidden_act,
        grouped_mm=grouped_mm,
    )


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``get_decoder().layers``), each with an ``mlp``."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in layers):
        raise TypeError(
            f"{type(llm).__name__}: expected get_decoder().layers to be a ModuleList of layers with an .mlp"
        )
    return layers


def select_layers(layers: LayerSelection, num_layers: int) -> list[int]:
    """Layer indices for ``"every_other"`` (0, 2, 4, ...), ``"all"`` or an explicit list (checked)."""
    if layers == "every_other":
        return list(range(num_layers))[::2]
    if layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str):
        raise TypeError(f"layers must be 'every_other', 'all' or a list of indices, got {layers!r}")
    indices = sorted({int(i) for i in layers})
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or not indices:
        raise ValueError(f"MoE layer indices {list(layers)} must be a non-empty subset of 0..{num_layers - 1}")
    return indices


def _router_init_for(router_init: RouterInit, index: int) -> nn.Linear | None:
    if isinstance(router_init, Mapping):
        return router_init.get(index)
    return router_init


def convert_to_moe(
    llm: nn.Module,
    *,
    layers: LayerSelection = "every_other",
    num_experts: int = 4,
    top_k: int = 1,
    meta_expert: bool = True,
    renormalize: bool = False,
    router_init: RouterInit = None,
    jitter: float = 0.0,
    router_bias: bool = True,
    capacity: Capacity | None = None,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    grouped_mm: GroupedMM = "auto",
) -> list[int]:
    """Upcycle the FFNs of the selected decoder layers in place; returns the replaced layer indices.

    Defaults are Med-MoE stage 3: every other layer from 0, 4 experts, top-1, meta expert, combine weight =
    the chosen expert's softmax probability (not renormalised), dropless, aux coefficients 0.
    ``router_init``: one classifier Linear(D, E) for every layer, or {layer index: Linear}.
    """
    blocks = decoder_layers(llm)
    hidden_act = getattr(getattr(llm, "config", None), "hidden_act", None)
    selected = select_layers(layers, len(blocks))
    already = [index for index in selected if isinstance(blocks[index].mlp, MoEFeedForward)]
    if already:
        raise ValueError(f"decoder layers {already} are already MoE layers; nothing was converted")
    for index in selected:
        blocks[index].mlp = upcycle_ffn(
            blocks[index].mlp,
            num_experts=num_experts,
            top_k=top_k,
            meta=meta_expert,
            renormalize=renormalize,
            router_init=_router_init_for(router_init, index),
            jitter=jitter,
            router_bias=router_bias,
            capacity=capacity,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            hidden_act=hidden_act,
            grouped_mm=grouped_mm,
        )
    return selected


def convert_from_sources(
    llm: nn.Module,
    sources: Sequence[nn.Module],
    *,
    layers: LayerSelection = "all",
    top_k: int = 1,
    meta_expert: bool = False,
    renormalize: bool = False,
    router_init: RouterInit = None,
    jitter: float = 0.0,
    router_bias: bool = True,
    capacity: Capacity | None = None,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    grouped_mm: GroupedMM = "auto",
) -> list[int]:
    """MedPLIB stage IV: layer i's FFN becomes experts [sources[0]'s FFN i, sources[1]'s FFN i, ...].

    ``sources`` are LMs of the same architecture as ``llm`` (LoRA merged). With ``meta_expert`` the
    ``llm``'s own FFN stays on as the meta expert. Returns the replaced layer indices.
    """
    blocks = decoder_layers(llm)
    source_blocks = [decoder_layers(source) for source in sources]
    if any(len(b) != len(blocks) for b in source_blocks):
        raise ValueError(f"source LMs have {[len(b) for b in source_blocks]} layers, the target {len(blocks)}")
    hidden_act = getattr(getattr(llm, "config", None), "hidden_act", None)
    selected = select_layers(layers, len(blocks))
    for index in selected:
        blocks[index].mlp = moe_from_ffns(
            [b[index].mlp for b in source_blocks],
            top_k=top_k,
            meta=blocks[index].mlp if meta_expert else None,
            renormalize=renormalize,
            router_init=_router_init_for(router_init, index),
            jitter=jitter,
            router_bias=router_bias,
            capacity=capacity,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            hidden_act=hidden_act,
            grouped_mm=grouped_mm,
        )
    return selected
