"""Structural changes a stage makes to the model, recorded so later stages can rebuild them.

The model built from ``model:`` in the config is always the dense LLaVA-shaped model. A stage may
change its structure: a router stage adds the modality classifier (``modality_classifier``), an MoE
stage turns decoder FFNs into ``MoEFeedForward`` layers. Each change is a plain dict (an *entry*)
appended to ``model.medpipe_structure``; ``save_handover`` stores the list in the hand-over's
metadata and ``restore`` replays the missing entries on a freshly built model before loading the
weights, so the next stage, ``medpipe evaluate`` and registry loading all see the same structure.
Replaying only rebuilds shapes (experts are copies of the dense FFN, routers random): the weights
come from the hand-over right after.

``stage_structure(cfg, stage)`` derives a stage's entries from the config alone; the runner applies them
(with the router classifier and source LLMs it has), ``medpipe params`` / ``memory`` replay them on the
model built without weights (``structure_after``), and ``restore`` replays a hand-over's recorded list:
every path goes through :func:`apply_entry`.

Entries (JSON-able, loadable with ``torch.load(weights_only=True)``):

    {"kind": "modality_classifier", "modalities": ["CT", "MRI", ...]}
    {"kind": "moe", "layers": [0, 2, ...], "num_experts": 4, "top_k": 1, "meta_expert": true,
     "renormalize": false, "router_bias": true, "capacity_factor": null, "eval_capacity_factor": null,
     "min_capacity": 0, "drop_policy": "position", "capacity_counts_padding": false, "aux_loss_coef": 0.0,
     "z_loss_coef": 0.0, "jitter": 0.0}

Hand-overs written before a field existed lack it; :func:`moe_entry` fills its default (the behaviour then).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig
from torch import nn

from lightningmodules.models.modality_router import ModalityClassifier

STRUCTURE_ATTR = "medpipe_structure"
CLASSIFIER_ATTR = "modality_classifier"


def model_structure(model: nn.Module) -> list[dict[str, Any]]:
    """The entries applied to ``model`` so far (empty for the dense model)."""
    return list(getattr(model, STRUCTURE_ATTR, []))


def _record(model: nn.Module, entry: dict[str, Any]) -> dict[str, Any]:
    object.__setattr__(model, STRUCTURE_ATTR, model_structure(model) + [dict(entry)])
    return entry


def _llm_hidden_size(model: nn.Module) -> int:
    return int(model.llm.config.hidden_size)


def add_modality_classifier(model: nn.Module, modalities: Sequence[str]) -> ModalityClassifier:
    """Attach ``model.modality_classifier`` (kept in the state dict, so it is handed over)."""
    if hasattr(model, CLASSIFIER_ATTR):
        existing = getattr(model, CLASSIFIER_ATTR)
        if existing.modalities != list(modalities):
            raise ValueError(
                f"the model already has a modality classifier for {existing.modalities}, the stage "
                f"asks for {list(modalities)}"
            )
        return existing
    reference = model.llm.get_input_embeddings().weight
    classifier = ModalityClassifier(hidden_size=_llm_hidden_size(model), modalities=list(modalities))
    model.add_module(CLASSIFIER_ATTR, classifier.to(device=reference.device))
    _record(model, {"kind": "modality_classifier", "modalities": list(modalities)})
    return classifier


DEFAULT_NUM_EXPERTS = 4  # moe.num_experts unset and no moe.sources


def moe_entry(
    *,
    layers: Any = "every_other",
    num_experts: int = DEFAULT_NUM_EXPERTS,
    top_k: int = 1,
    meta_expert: bool = True,
    renormalize: bool = False,
    router_bias: bool = True,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    min_capacity: int = 0,
    drop_policy: str = "position",
    capacity_counts_padding: bool = False,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    jitter: float = 0.0,
) -> dict[str, Any]:
    """An ``moe`` entry; ``layers``: ``every_other`` / ``all`` (resolved against the model when applied) or
    decoder layer indices (what the model records)."""
    return {
        "kind": "moe",
        "layers": layers if isinstance(layers, str) else [int(i) for i in layers],
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "meta_expert": bool(meta_expert),
        "renormalize": bool(renormalize),
        "router_bias": bool(router_bias),
        "capacity_factor": None if capacity_factor is None else float(capacity_factor),
        "eval_capacity_factor": None if eval_capacity_factor is None else float(eval_capacity_factor),
        "min_capacity": int(min_capacity),
        "drop_policy": str(drop_policy),
        "capacity_counts_padding": bool(capacity_counts_padding),
        "aux_loss_coef": float(aux_loss_coef),
        "z_loss_coef": float(z_loss_coef),
        "jitter": float(jitter),
    }


def stage_structure(cfg: DictConfig, name: str) -> list[dict[str, Any]]:
    """The entries stage ``name`` adds to the model it starts from, from the config alone: the modality
    classifier of a router stage, the MoE layers of an ``moe`` block (experts from ``moe.sources`` have
    the shapes of upcycled ones: the stage passes the source LLMs to :func:`apply_entry`)."""
    stage = cfg.stages[name]
    entries = []
    if stage.router is not None:  # only router stages have a router section (config validation)
        entries.append({"kind": "modality_classifier", "modalities": list(stage.router.modalities)})
    moe = stage.moe
    if moe is not None:
        entries.append(
            moe_entry(
                layers=moe.layers if isinstance(moe.layers, str) else list(moe.layers),
                num_experts=moe.num_experts or len(moe.sources or []) or DEFAULT_NUM_EXPERTS,
                top_k=moe.top_k,
                meta_expert=moe.meta_expert,
                renormalize=moe.renormalize,
                router_bias=moe.router_bias,
                capacity_factor=moe.capacity_factor,
                eval_capacity_factor=moe.eval_capacity_factor,
                min_capacity=moe.min_capacity,
                drop_policy=moe.drop_policy,
                capacity_counts_padding=moe.capacity_counts_padding,
                aux_loss_coef=moe.aux_loss_coef,
                z_loss_coef=moe.z_loss_coef,
                jitter=moe.jitter,
            )
        )
    return entries


def structure_after(cfg: DictConfig, name: str) -> list[dict[str, Any]]:
    """The entries of the model after stage ``name`` trained: those of the model it starts from (its
    ``init_from`` stage, else the previous stage; a hand-over file's own list) plus its own."""
    names = list(cfg.stages.keys())
    if name not in names:
        raise ValueError(f"stage {name!r} is not in the config (stages: {', '.join(names)})")
    init = cfg.stages[name].init_from
    if init in names:
        start = structure_after(cfg, init)
    elif init is not None:
        from pipeline.handover import handover_structure

        start = handover_structure(init)
    else:
        index = names.index(name)
        start = structure_after(cfg, names[index - 1]) if index else []
    return start + stage_structure(cfg, name)


def add_moe(
    model: nn.Module,
    *,
    router_init: nn.Linear | None = None,
    sources: Sequence[nn.Module] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Turn decoder FFNs of ``model.llm`` into MoE layers: :func:`apply_entry` of ``moe_entry(**fields)``."""
    if sources:
        fields["num_experts"] = len(sources)
    return apply_entry(model, moe_entry(**fields), router_init=router_init, sources=sources)


def _apply_modality_classifier(model: nn.Module, entry: dict[str, Any], **_: Any) -> dict[str, Any]:
    add_modality_classifier(model, entry["modalities"])
    return model_structure(model)[-1]


def _apply_moe(
    model: nn.Module,
    entry: dict[str, Any],
    *,
    router_init: nn.Linear | None = None,
    sources: Sequence[nn.Module] | None = None,
) -> dict[str, Any]:
    """Without ``sources`` the experts are ``num_experts`` copies of each dense FFN (Med-MoE upcycling);
    with ``sources`` (causal LMs of the same architecture, e.g. MedPLIB's stage-II and stage-III LLMs)
    expert e of layer i is ``sources[e]``'s FFN i. ``meta_expert`` keeps the model's own FFN always on;
    ``router_init``: a classifier ``Linear(D, E)`` copied into every router."""
    from lightningmodules.models.moe import Capacity, convert_from_sources, convert_to_moe

    fields = moe_entry(**{k: v for k, v in entry.items() if k != "kind"})  # older hand-overs lack later fields
    capacity = None
    if fields["capacity_factor"] is not None:
        capacity = Capacity(
            factor=fields["capacity_factor"],
            eval_factor=fields["eval_capacity_factor"],
            min_capacity=fields["min_capacity"],
            drop=fields["drop_policy"],
            count_padding=fields["capacity_counts_padding"],
        )
    common = {
        "top_k": fields["top_k"],
        "meta_expert": fields["meta_expert"],
        "renormalize": fields["renormalize"],
        "router_init": router_init,
        "router_bias": fields["router_bias"],
        "capacity": capacity,
        "load_balance_coef": fields["aux_loss_coef"],
        "z_loss_coef": fields["z_loss_coef"],
        "jitter": fields["jitter"],
    }
    if sources:
        if len(sources) != fields["num_experts"]:
            raise ValueError(f"{len(sources)} source LLMs for an moe entry of {fields['num_experts']} experts")
        replaced = convert_from_sources(model.llm, list(sources), layers=fields["layers"], **common)
    else:
        replaced = convert_to_moe(model.llm, layers=fields["layers"], num_experts=fields["num_experts"], **common)
    return _record(model, {**fields, "layers": [int(i) for i in replaced]})


_APPLY = {"modality_classifier": _apply_modality_classifier, "moe": _apply_moe}


def apply_entry(
    model: nn.Module,
    entry: dict[str, Any],
    *,
    router_init: nn.Linear | None = None,
    sources: Sequence[nn.Module] | None = None,
) -> dict[str, Any]:
    """Apply one entry to ``model`` and record it (MoE layers as resolved indices); returns the recorded
    entry. Replayed without ``router_init`` / ``sources`` it rebuilds shapes only (routers random, experts
    copies of the dense FFN): a hand-over's weights are loaded right after."""
    apply = _APPLY.get(entry.get("kind"))
    if apply is None:
        raise ValueError(f"unknown model structure entry {entry!r} (this medpipe knows {', '.join(_APPLY)})")
    return apply(model, entry, router_init=router_init, sources=sources)


def apply_stage_structure(
    cfg: DictConfig,
    name: str,
    model: nn.Module,
    *,
    router_init: nn.Linear | None = None,
    sources: Sequence[nn.Module] | None = None,
) -> list[dict[str, Any]]:
    """Apply :func:`stage_structure` of stage ``name`` to ``model``; ``router_init`` / ``sources`` go to its
    MoE entry (without them: shapes only). Returns the recorded entries."""
    return [apply_entry(model, entry, router_init=router_init, sources=sources) for entry in stage_structure(cfg, name)]


def apply_structure(model: nn.Module, entries: Sequence[dict[str, Any]], *, source: str = "hand-over") -> int:
    """Replay the ``entries`` the model does not have yet; returns how many were applied.

    The model's own entries must be a prefix of ``entries`` (same changes, same order)."""
    have = model_structure(model)
    entries = [dict(e) for e in entries]
    if have != entries[: len(have)]:
        raise ValueError(f"{source}: its model structure {entries} does not extend the model's {have}")
    for entry in entries[len(have) :]:
        apply_entry(model, entry)
    return len(entries) - len(have)
