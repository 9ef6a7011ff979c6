"""MoE-LLaVA and Med-MoE checkpoints (stage 3, and their dense stage-2 folders) into medpipe's MoE model.

Sources read (``MoE-LLaVA`` = github.com/PKU-YuanGroup/MoE-LLaVA@6cb5f66, ``Med-MoE`` =
github.com/jiangsongtao/Med-MoE@148cbd6, a fork of it):

- The model is ``MoELLaVA<LLM>ForCausalLM`` (``moellava/model/language_model/llava_<llm>_moe.py``), saved by
  ``save_pretrained``: the LLM's own keys (``model.*``, ``lm_head.*``), the projector
  ``model.mm_projector.image_spatial_proj.*`` (``moellava/model/multimodal_projector/builder.py:117-122``:
  ``build_projector`` wraps the image projector; ``mlp2x_gelu`` = ``Sequential(Linear, GELU, Linear)``, keys
  ``.0`` / ``.2``; ``linear`` = one Linear; its video projectors are ``nn.Identity`` without weights when
  ``mm_video_tower`` is null) and, when saved with it, the CLIP tower ``model.image_tower.image_tower.*``
  (``moellava/model/multimodal_encoder/clip_encoder.py:26``: a ``CLIPVisionModel`` at ``image_tower``).
- MoE layers (``llava_phi_moe.py:481-497`` / ``llava_stablelm_moe.py``): the decoder layer's ``mlp`` becomes
  DeepSpeed's ``MoE``: ``mlp.deepspeed_moe.gate.wg`` (the router), ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}``
  (deep copies of the dense FFN: ``fc1`` / ``fc2`` for Phi, ``gate_proj`` / ``up_proj`` / ``down_proj`` for
  StableLM, Llama, Mistral, Qwen1.5). DeepSpeed 0.9.5 (MoE-LLaVA's pin, ``pyproject.toml``) makes ``wg`` a
  ``Linear(d, E, bias=False)``; Med-MoE's replacement DeepSpeed (``moe/sharded_moe.py:344-396``, which its README
  says to copy over DeepSpeed's) makes it ``Router.fc1``, a ``Linear(d, E)`` **with** bias, stored as ``gate.wg``.
- Med-MoE's meta expert (``moe/layer.py:79,118-128``): ``MoE(outert_expert_mlp=<the dense FFN>)`` keeps the
  original FFN as ``mlp.meta_moe`` and adds its output to the routed one: ``out = moe(x) + meta_moe(x)``. MoE-LLaVA
  has no ``meta_moe``. The meta expert is therefore read from the keys, not from the config.
- ``config.json``: ``model_type`` ``moe_llava_<llm>`` (``llava_<llm>`` for the dense stage-2 model), the LLM's
  own fields, ``moe`` = {``moe_enable``, ``moe_mode``, ``moe_layers_idx`` (the resolved layer list),
  ``num_experts`` (one count per MoE layer), ``top_k_experts``, ``capacity_factor``, ``eval_capacity_factor``,
  ``min_capacity``, ``use_residual``, ``router_aux_loss_coef``, ``ep_size``, ...} (``llava_phi_moe.py:431-479``),
  and the vision fields ``mm_image_tower``, ``image_projector_type``, ``mm_vision_select_layer``,
  ``mm_vision_select_feature``, ``image_aspect_ratio``, ``mm_hidden_size`` (``moellava/model/llava_arch.py:54-119``).
  Med-MoE's StableLM is ``StableLMEpochConfig`` (``stablelm/configuration_stablelm_epoch.py``: ``rope_pct``,
  ``norm_eps``, ``use_qkv_bias``), converted here to transformers' ``stablelm`` (same weight names).

How it maps: the checkpoint's ``moe`` config becomes one medpipe ``moe`` structure entry (``pipeline/structure.py``)
applied before the weights (layers, experts, top-k, meta expert from the keys, router bias from the keys), then
``wg`` -> ``mlp.router.linear``, ``deepspeed_experts.{e}.*`` -> expert e of the stacked ``mlp.experts`` (``w_in`` =
``[gate | up]`` transposed, or ``fc1`` transposed; ``w_out`` = ``down`` / ``fc2`` transposed; biases), ``meta_moe.*``
-> ``mlp.meta_expert.*`` (the dense FFN module itself).

Routing, as the released code computes it:

- Med-MoE: top-1, combine weight = the chosen expert's softmax probability (not renormalised,
  ``sharded_moe.py:267-272``), plus the meta expert; the model hard-codes ``capacity_factor=4`` and
  ``drop_tokens=False`` (``llava_phi_moe.py:490-496, 534-539``), which sets the capacity to the fullest expert's
  count (``sharded_moe.py:210-214``): dropless, whatever the config's capacity fields say. Imported as dropless.
- MoE-LLaVA: DeepSpeed 0.9.5's gate with the config's ``capacity_factor`` / ``eval_capacity_factor`` /
  ``min_capacity`` over the flattened micro-batch (padding included): top-1 drops a random subset of an
  over-full expert's tokens (``use_rts``, on by default), top-2 the later ones (first choices before second
  choices), and top-2 renormalises the two weights to sum to 1. Imported with those settings
  (``Capacity(count_padding=True)``, drop ``random`` / ``position``, ``renormalize`` for top-2).

Not reproduced, and why (UNVERIFIED against a released file: no weights were downloaded; the key names above are
read from the code that writes them):

- DeepSpeed's top-2 gate picks the *second* expert with Gumbel noise added to the logits, in evaluation too
  (``sharded_moe.py:291-297``, the same in DeepSpeed 0.9.5): the released model's second choice is random;
  medpipe takes the second-best probability (the noise-free choice).
- With top-2 and a capacity that drops a token's second choice, DeepSpeed renormalises over the kept choice only;
  medpipe renormalises over the two chosen before dropping (no difference when nothing is dropped, e.g. in
  evaluation with MoE-LLaVA's ``eval_capacity_factor`` 2 and 4 experts).
- ``use_residual`` (Residual-MoE, a second dense FFN and a coefficient Linear) and expert parallelism
  (``ep_size`` > 1: ``save_pretrained`` on one rank holds only its local experts) are refused; Qwen-1 and MiniCPM
  LLMs (remote code with their own key names) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.importers.checkpoints import read_config
from pipeline.importers.keymap import CheckpointLayoutError, ImportReport, Rule

ROTARY = Rule(r".*\.rotary_emb\.inv_freq", None, "rotary frequencies (a buffer transformers recomputes)")

# MoE-LLaVA's model types (moe_llava_<llm> for stage 3, llava_<llm> for its dense stages) -> transformers' LLM type
LLM_TYPES = {"phi": "phi", "stablelm": "stablelm", "llama": "llama", "mistral": "mistral", "qwen1_5": "qwen2"}
UNSUPPORTED_LLMS = {"qwen": "Qwen-1 (remote code, its own key names)", "minicpm": "MiniCPM (remote code)"}
PROJECTORS = {"mlp2x_gelu": "mlp", "linear": "linear"}

# DeepSpeed MoE layer keys (MoE-LLaVA, Med-MoE and MedPLIB): mlp.deepspeed_moe.{gate.wg, experts.deepspeed_experts.E}
GATE = r"mlp\.deepspeed_moe\.gate\.wg\.(weight|bias)"
EXPERT = r"mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj|fc1|fc2)\.(weight|bias)"
META = r"mlp\.meta_moe\.(.+)"
MOE_KEY = r"mlp\.(?:deepspeed_moe|meta_moe)\."
CHECKPOINT_ROWS = "@checkpoint_rows"  # a vocabulary-sized target seen with the checkpoint's row count


def deepspeed_moe_rules(source_layers: str, target_layers: str) -> list[Rule]:
    """The rules of DeepSpeed MoE layers under ``source_layers`` (a regex ending in the layer list, e.g.
    ``model\\.layers``) into medpipe's ``MoEFeedForward`` under ``target_layers`` (e.g. ``llm.model.layers``):
    the router, each expert's projections (as :func:`expert_views` names them) and the meta expert."""
    return [
        Rule(rf"{source_layers}\.(\d+)\.{GATE}", rf"{target_layers}.\1.mlp.router.linear.\2"),
        Rule(rf"{source_layers}\.(\d+)\.{EXPERT}", rf"{target_layers}.\1.mlp.experts.\2.\3.\4"),
        Rule(rf"{source_layers}\.(\d+)\.{META}", rf"{target_layers}.\1.mlp.meta_expert.\2"),
    ]


RULES = [
    *deepspeed_moe_rules(r"model\.layers", "llm.model.layers"),
    Rule(r"model\.mm_projector\.image_spatial_proj\.0\.(weight|bias)", r"connector.fc1.\1"),
    Rule(r"model\.mm_projector\.image_spatial_proj\.2\.(weight|bias)", r"connector.fc2.\1"),
    Rule(r"model\.mm_projector\.image_spatial_proj\.(weight|bias)", r"connector.proj.\1"),
    # transformers < 5 named the tower's parameters vision_model.*, 5.x without that level: both accepted
    Rule(r"model\.image_tower\.image_tower\.(?:vision_model\.)?(.+)", r"vision.encoder.\1"),
    ROTARY,
    Rule(
        rf"model\.(?!mm_projector\.|image_tower\.|layers\.\d+\.{MOE_KEY})(.+)(?<!\.inv_freq)",
        r"llm.model.\1",
    ),
    Rule(r"lm_head\.weight", r"llm.lm_head.weight"),
    Rule(r"lm_head\.bias", r"llm.lm_head.bias" + CHECKPOINT_ROWS),  # Phi: a vocabulary table (vocab_bias_view)
]

TOWER_PREFIX = "model.image_tower.image_tower."


# -- stacked experts seen as per-expert Linears --------------------------------------------------------


@dataclass
class TargetViews:
    """Model keys that do not map one source key to one target key, shown to the key mapping as the keys the
    checkpoint has (``virtual``: key -> a tensor of the shape the checkpoint must give, on the meta device),
    standing for the model keys ``replaced``; ``required``: virtual keys the checkpoint must fill even outside
    the parts it fills (e.g. both halves of a LoRA pair); ``assemble`` turns the mapped virtual tensors into
    the model's."""

    virtual: dict[str, torch.Tensor] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    builders: list[Callable[[dict[str, torch.Tensor], ImportReport], None]] = field(default_factory=list)
    required: set[str] = field(default_factory=set)

    def merge(self, other: TargetViews) -> TargetViews:
        self.virtual.update(other.virtual)
        self.replaced |= other.replaced
        self.builders += other.builders
        self.required |= other.required
        return self

    def assemble(self, mapped: dict[str, torch.Tensor], report: ImportReport) -> dict[str, torch.Tensor]:
        """``mapped`` with the virtual keys replaced by the model keys they stand for."""
        out = dict(mapped)
        for build in self.builders:
            build(out, report)
        for key in self.virtual:
            out.pop(key, None)
        return out


def _meta(*shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(*shape, dtype=like.dtype, device="meta")


def expert_views(model: nn.Module, prefix: str = "llm.") -> TargetViews:
    """Every ``MoEFeedForward``'s stacked experts under ``prefix`` as per-expert Linears (:func:`grouped_views`)."""
    from lightningmodules.models.moe import moe_layers

    views = TargetViews()
    for name, layer in moe_layers(model):
        if (name + ".").startswith(prefix):
            views.merge(grouped_views(layer.experts, f"{name}.experts"))
    return views


def grouped_views(experts: nn.Module, base: str) -> TargetViews:
    """A ``GroupedExperts`` at state-dict prefix ``base`` as per-expert Linears, named as the released FFNs name
    them: ``<base>.<e>.{gate_proj,up_proj,down_proj}.{weight,bias}`` (gated) or ``<base>.<e>.{fc1,fc2}.*``
    (ungated); weights in ``nn.Linear`` layout (out, in)."""
    views = TargetViews()
    d, f, o = experts.hidden_size, experts.ffn_size, experts.out_size
    like = experts.w_in
    names = ("gate_proj", "up_proj", "down_proj") if experts.gated else ("fc1", "fc2")
    for e in range(experts.num_experts):
        for part in names[:-1]:
            views.virtual[f"{base}.{e}.{part}.weight"] = _meta(f, d, like=like)
            if experts.has_bias:
                views.virtual[f"{base}.{e}.{part}.bias"] = _meta(f, like=like)
        views.virtual[f"{base}.{e}.{names[-1]}.weight"] = _meta(o, f, like=like)
        if experts.has_bias:
            views.virtual[f"{base}.{e}.{names[-1]}.bias"] = _meta(o, like=like)
    stacked = ["w_in", "w_out"] + (["b_in", "b_out"] if experts.has_bias else [])
    views.replaced |= {f"{base}.{p}" for p in stacked}
    views.builders.append(_stacker(base, experts.num_experts, names, experts.has_bias))
    return views


def _stacker(base: str, num_experts: int, names: tuple[str, ...], bias: bool):
    def build(mapped: dict[str, torch.Tensor], _report: ImportReport) -> None:
        *inputs, output = names
        w_in, w_out, b_in, b_out = [], [], [], []
        for e in range(num_experts):
            # nn.Linear (out, in) -> matmul layout (in, out); gated: [gate | up] side by side
            w_in.append(torch.cat([mapped[f"{base}.{e}.{p}.weight"].t() for p in inputs], dim=1))  # (D, 2F|F)
            w_out.append(mapped[f"{base}.{e}.{output}.weight"].t())  # (F, O)
            if bias:
                b_in.append(torch.cat([mapped[f"{base}.{e}.{p}.bias"] for p in inputs]))  # (2F|F,)
                b_out.append(mapped[f"{base}.{e}.{output}.bias"])  # (O,)
        mapped[f"{base}.w_in"] = torch.stack(w_in)  # (E, D, 2F|F)
        mapped[f"{base}.w_out"] = torch.stack(w_out)  # (E, F, O)
        if bias:
            mapped[f"{base}.b_in"] = torch.stack(b_in)  # (E, 2F|F)
            mapped[f"{base}.b_out"] = torch.stack(b_out)  # (E, O)

    return build


def vocab_bias_view(model: nn.Module, source: Mapping[str, torch.Tensor], *, source_key: str, target_key: str):
    """The LM head's bias (Phi) as a vocabulary table: the checkpoint's rows (V_src,) into the model's (V,) as
    ``copy_vocab_rows`` does for the weight (shared rows copied, added tokens get the mean, extra rows left out)."""
    targets = model.state_dict()
    views = TargetViews()
    if source_key not in source or target_key not in targets:
        return views
    target = targets[target_key]
    virtual = target_key + CHECKPOINT_ROWS
    views.virtual[virtual] = _meta(*source[source_key].shape, like=target)
    views.replaced.add(target_key)

    def build(mapped: dict[str, torch.Tensor], report: ImportReport) -> None:
        rows, src = target.shape[0], mapped[virtual]
        shared = min(rows, src.shape[0])
        out = src[:shared].to(target.dtype)
        if rows > src.shape[0]:
            out = torch.cat([out, out.float().mean().to(target.dtype).expand(rows - src.shape[0])])
            report.notes.append(f"{target_key}: rows {src.shape[0]}..{rows - 1} (tokens medpipe adds) set to the mean")
        elif src.shape[0] > rows:
            report.notes.append(f"{target_key}: checkpoint rows {rows}..{src.shape[0] - 1} left out")
        mapped[target_key] = out

    views.builders.append(build)
    return views


# -- the layout ---------------------------------------------------------------------------------------


def llm_kind(config: Mapping[str, Any]) -> str | None:
    """The LLM part of a MoE-LLaVA model type (``moe_llava_phi`` -> ``phi``); None for other checkpoints.
    ``llava_llama`` / ``llava_mistral`` are LLaVA's own types too: MoE-LLaVA's carry ``mm_image_tower``."""
    model_type = str(config.get("model_type", ""))
    if model_type.startswith("moe_llava_"):
        return model_type.removeprefix("moe_llava_")
    if model_type.startswith("llava_") and ("mm_image_tower" in config or "image_projector_type" in config):
        return model_type.removeprefix("llava_")
    return None


def moe_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``moe`` dict of a stage-3 config (None for a dense checkpoint)."""
    moe = config.get("moe")
    if str(config.get("model_type", "")).startswith("moe_llava_") and isinstance(moe, dict) and moe.get("moe_enable"):
        return moe
    return None


def _layer_experts(moe: Mapping[str, Any], path: Path | str) -> tuple[list[int], int]:
    """(MoE layer indices, experts per layer) from the ``moe`` config; one count for every layer."""
    layers = moe.get("moe_layers_idx")
    counts = moe.get("num_experts")
    file = Path(path) / "config.json"
    if not isinstance(layers, list) or not layers:
        raise CheckpointLayoutError(f"{file}: moe.moe_layers_idx is {layers!r}, expected the list of MoE layers")
    if isinstance(counts, int):
        counts = [counts] * len(layers)
    if not isinstance(counts, list) or len(counts) != len(layers):
        raise CheckpointLayoutError(f"{file}: moe.num_experts {counts!r} does not give one count per MoE layer")
    if len(set(counts)) != 1:
        raise CheckpointLayoutError(
            f"{file}: moe.num_experts {counts} differs between layers; medpipe's moe entry has one expert count"
        )
    return [int(i) for i in layers], int(counts[0])


def check_moe(moe: Mapping[str, Any], path: Path) -> None:
    """What a DeepSpeed ``moe`` config may say for medpipe to hold the same MoE layers."""
    file = path / "config.json"
    if moe.get("use_residual"):
        raise CheckpointLayoutError(f"{file}: moe.use_residual is true (Residual-MoE); medpipe has none")
    if int(moe.get("ep_size", 1) or 1) != 1:
        raise CheckpointLayoutError(
            f"{file}: moe.ep_size {moe['ep_size']}: experts split over ranks (each saved file holds its own)"
        )
    if int(moe.get("top_k_experts", 1)) not in (1, 2):
        raise CheckpointLayoutError(f"{file}: moe.top_k_experts {moe['top_k_experts']}; DeepSpeed has 1 or 2")
    _layer_experts(moe, path)


def deepspeed_moe_entry(moe: Mapping[str, Any], keys: list[str], path: Path, *, dropless: bool) -> dict[str, Any]:
    """The medpipe ``moe`` entry of DeepSpeed MoE layers described by ``moe`` (``moe_layers_idx``,
    ``num_experts``, ``top_k_experts``, capacities, ``router_aux_loss_coef``); the meta expert and the router's
    bias are read from the keys. ``dropless``: the model ignores its capacity (Med-MoE); otherwise DeepSpeed's
    gate: the config's factors over the flattened micro-batch (padding included), top-1 dropping a random
    subset (``use_rts``), top-2 the later assignments."""
    from pipeline.structure import moe_entry

    layers, num_experts = _layer_experts(moe, path)
    top_k = int(moe.get("top_k_experts", 1))
    capacity: dict[str, Any] = {}
    if not dropless:
        capacity = {
            "capacity_factor": float(moe.get("capacity_factor", 1.0)),
            "eval_capacity_factor": float(moe.get("eval_capacity_factor", 1.0)),
            "min_capacity": int(moe.get("min_capacity", 0)),
            "drop_policy": "random" if top_k == 1 else "position",  # top1gating's use_rts / top2's order
            "capacity_counts_padding": True,  # the gate sees the flattened micro-batch
        }
    return moe_entry(
        layers=layers,
        num_experts=num_experts,
        top_k=top_k,
        meta_expert=any(".mlp.meta_moe." in k for k in keys),
        renormalize=top_k == 2,  # DeepSpeed's top2gating divides the two weights by their sum
        router_bias=any(k.endswith(".deepspeed_moe.gate.wg.bias") for k in keys),
        aux_loss_coef=float(moe.get("router_aux_loss_coef", 0.0) or 0.0),
        **capacity,
    )


class MoELLaVALayout:
    """``model.init: {format: moe_llava, path: <folder>}`` (module docstring)."""

    name = "moe_llava"

    def read_config(self, path: Path) -> dict[str, Any]:
        return read_config(path)

    def llm_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        kind = llm_kind(config)
        if kind is None or kind not in LLM_TYPES:
            return None
        drop = ("mm_", "image_", "video_")
        fields = {
            k: v
            for k, v in config.items()
            if not k.startswith(drop) and k not in ("moe", "architectures", "auto_map", "use_mm_proj")
        }
        if "rope_pct" in fields:  # StableLM-2's StableLMEpochConfig (Med-MoE): transformers' stablelm names
            fields["partial_rotary_factor"] = fields.pop("rope_pct")
            fields["layer_norm_eps"] = fields.pop("norm_eps", 1e-5)
            fields.setdefault("qk_layernorm", False)
            fields.setdefault("use_parallel_residual", False)
        return {**fields, "model_type": LLM_TYPES[kind]}

    def vision_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def parts(self, keys: list[str]) -> set[str]:
        return {"llm", "connector"} | ({"vision"} if any(k.startswith(TOWER_PREFIX) for k in keys) else set())

    def check_settings(self, config: dict[str, Any], model_cfg: Any, path: Path, keys: list[str]) -> None:
        file = path / "config.json"
        kind = llm_kind(config)
        if kind is None:
            raise CheckpointLayoutError(
                f"{file}: model_type {config.get('model_type')!r} is not a MoE-LLaVA / Med-MoE model "
                "(moe_llava_<llm> or llava_<llm> with mm_image_tower)"
            )
        if kind not in LLM_TYPES:
            why = UNSUPPORTED_LLMS.get(kind, "not a transformers LLM medpipe maps")
            raise CheckpointLayoutError(f"{file}: model_type {config['model_type']!r}: {why}")
        if config.get("mm_video_tower"):
            raise CheckpointLayoutError(f"{file}: mm_video_tower is set; medpipe imports image-only models")
        projector = config.get("image_projector_type", "linear")
        if projector not in PROJECTORS:
            raise CheckpointLayoutError(
                f"{file}: image_projector_type {projector!r}; medpipe maps {', '.join(PROJECTORS)}"
            )
        moe = moe_settings(config)
        if moe is not None:
            check_moe(moe, path)
        expected = {
            "model.connector.type": (PROJECTORS[projector], "image_projector_type"),
            "model.vision.select_layer": (config.get("mm_vision_select_layer", -2), "mm_vision_select_layer"),
            "model.vision.select_feature": (
                config.get("mm_vision_select_feature", "patch"),
                "mm_vision_select_feature",
            ),
            "model.vision.pad_square": (config.get("image_aspect_ratio", "square") == "pad", "image_aspect_ratio"),
        }
        actual = {
            "model.connector.type": model_cfg.connector.type,
            "model.vision.select_layer": model_cfg.vision.select_layer,
            "model.vision.select_feature": model_cfg.vision.select_feature,
            "model.vision.pad_square": model_cfg.vision.pad_square,
        }
        for key, (value, source) in expected.items():
            if actual[key] != value:
                raise CheckpointLayoutError(
                    f"{key}: {actual[key]!r}, but {file} has {source} = {config.get(source)!r} (set {key}: {value!r})"
                )
        if model_cfg.connector.aggregation != "none":
            raise CheckpointLayoutError(
                f"model.connector.aggregation: {model_cfg.connector.aggregation!r}; MoE-LLaVA feeds every patch "
                "token (set model.connector.aggregation: none)"
            )

    def structure(self, config: dict[str, Any], keys: list[str], path: Path) -> list[dict[str, Any]]:
        """The ``moe`` entry the checkpoint's model has (none for a dense stage-2 folder)."""
        moe = moe_settings(config)
        if moe is None:
            return []
        # Med-MoE (the meta expert's keys) hard-codes a dropless gate; MoE-LLaVA runs DeepSpeed 0.9.5's capacity
        meta = any(".mlp.meta_moe." in k for k in keys)
        return [deepspeed_moe_entry(moe, keys, path, dropless=meta)]

    def rules(self, config: dict[str, Any], model_cfg: Any) -> list[Rule]:
        return RULES

    def views(self, model: nn.Module, source: Mapping[str, torch.Tensor], config: dict[str, Any]) -> TargetViews:
        views = expert_views(model)
        return views.merge(vocab_bias_view(model, source, source_key="lm_head.bias", target_key="llm.lm_head.bias"))


LAYOUT = MoELLaVALayout()
