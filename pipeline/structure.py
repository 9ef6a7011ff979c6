"""Structural changes a stage makes to the model, recorded so later stages can rebuild them.

The model built from ``model:`` in the config is always the dense LLaVA-shaped model. A stage may
change its structure: a router stage adds the modality classifier (``modality_classifier``), an MoE
stage turns decoder FFNs into ``MoEFeedForward`` layers. Each change is a plain dict (an *entry*)
appended to ``model.medpipe_structure``; ``save_handover`` stores the list in the hand-over's
metadata and ``restore`` replays the missing entries on a freshly built model before loading the
weights, so the next stage, ``medpipe evaluate`` and registry loading all see the same structure.
Replaying only rebuilds shapes (experts are copies of the dense FFN, routers random): the weights
come from the hand-over right after.

Entries (JSON-able, loadable with ``torch.load(weights_only=True)``):

    {"kind": "modality_classifier", "modalities": ["CT", "MRI", ...]}
    {"kind": "moe", "layers": [0, 2, ...], "num_experts": 4, "top_k": 1, "meta_expert": true,
     "renormalize": false, "capacity_factor": null, "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "jitter": 0.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def moe_entry(
    *,
    layers: list[int],
    num_experts: int,
    top_k: int,
    meta_expert: bool,
    renormalize: bool,
    capacity_factor: float | None,
    aux_loss_coef: float,
    z_loss_coef: float,
    jitter: float = 0.0,
) -> dict[str, Any]:
    return {
        "kind": "moe",
        "layers": [int(i) for i in layers],
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "meta_expert": bool(meta_expert),
        "renormalize": bool(renormalize),
        "capacity_factor": None if capacity_factor is None else float(capacity_factor),
        "aux_loss_coef": float(aux_loss_coef),
        "z_loss_coef": float(z_loss_coef),
        "jitter": float(jitter),
    }


def add_moe(
    model: nn.Module,
    *,
    layers: Any = "every_other",
    num_experts: int = 4,
    top_k: int = 1,
    meta_expert: bool = True,
    renormalize: bool = False,
    capacity_factor: float | None = None,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    jitter: float = 0.0,
    router_init: nn.Linear | None = None,
    sources: Sequence[nn.Module] | None = None,
) -> dict[str, Any]:
    """Turn the selected decoder FFNs of ``model.llm`` into MoE layers and record the entry.

    Without ``sources`` the experts are ``num_experts`` copies of each dense FFN (Med-MoE upcycling);
    with ``sources`` (causal LMs of the same architecture, e.g. MedPLIB's stage-II and stage-III LLMs)
    expert e of layer i is ``sources[e]``'s FFN i (``convert_from_sources``). ``meta_expert`` keeps the
    model's own FFN always on. ``router_init``: a classifier ``Linear(D, E)`` copied into every router.
    """
    from lightningmodules.models.moe import convert_from_sources, convert_to_moe

    common = {
        "top_k": top_k,
        "meta_expert": meta_expert,
        "renormalize": renormalize,
        "router_init": router_init,
        "capacity_factor": capacity_factor,
        "load_balance_coef": aux_loss_coef,
        "z_loss_coef": z_loss_coef,
        "jitter": jitter,
    }
    layers = list(layers) if not isinstance(layers, str) else layers
    if sources:
        num_experts = len(sources)
        replaced = convert_from_sources(model.llm, list(sources), layers=layers, **common)
    else:
        replaced = convert_to_moe(model.llm, layers=layers, num_experts=num_experts, **common)
    entry = moe_entry(
        layers=replaced,
        num_experts=num_experts,
        top_k=top_k,
        meta_expert=meta_expert,
        renormalize=renormalize,
        capacity_factor=capacity_factor,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
        jitter=jitter,
    )
    return _record(model, entry)


def apply_entry(model: nn.Module, entry: dict[str, Any]) -> None:
    """Rebuild one recorded change (shapes only; the weights are loaded afterwards)."""
    kind = entry.get("kind")
    if kind == "modality_classifier":
        add_modality_classifier(model, entry["modalities"])
    elif kind == "moe":
        add_moe(
            model,
            layers=entry["layers"],
            num_experts=entry["num_experts"],
            top_k=entry["top_k"],
            meta_expert=entry["meta_expert"],
            renormalize=entry["renormalize"],
            capacity_factor=entry["capacity_factor"],
            aux_loss_coef=entry["aux_loss_coef"],
            z_loss_coef=entry["z_loss_coef"],
            jitter=entry.get("jitter", 0.0),
        )
    else:
        raise ValueError(f"unknown model structure entry {entry!r} (this medpipe knows modality_classifier, moe)")


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
