"""Weights handed from one stage to the next (and to evaluation, the registry, export): a delta per stage.

A hand-over is a small JSON manifest (``stages/<stage>/handover.json``) beside safetensors files that hold
only what the stage changed: the weights it trained, its LoRA adapters as factors (A, B: not the merged
weights, which for ``all-linear`` would be most of the LLM) and the weights of modules its structure entries
added (MoE experts and routers, the modality classifier). The manifest names the base checkpoints the model
is built from (``base``), the previous hand-over of the chain (``previous``, relative to the manifest), the
structure entries of the model after the stage, the stage's LoRA settings and each delta file with its
SHA-256. ``restore`` rebuilds the full model from the chain: build from the config (the base weights), then
for each hand-over, oldest first: replay its structure entries, wrap the same LoRA adapters, load its delta
and merge the adapters with the code the stage itself merges with (``pipeline.trainable.merge_lora``), so
the restored weights are the ones the stage ended with, bit for bit.

Under sharded training (FSDP2 / ``ModelParallelStrategy``) each rank writes the local shards of its
sharded parameters to its own file (``<stem>-rank00001-of-00002.safetensors``; dimension 0, in rank order),
so nothing is gathered on one rank; only the file names and hashes travel to rank 0, which writes the
manifest.

safetensors holds tensors only, so reading a hand-over never runs code. Hand-overs of format 1 (one
``torch.save`` file with the whole state dict, ``handover.pt``) still load, through ``safe_load``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.fingerprints import file_sha256
from pipeline.safe_load import NotAHandoverError, check_handover, load_weights
from pipeline.structure import apply_structure, model_structure

FORMAT = "medpipe-handover"
FORMAT_VERSION = 2
LEGACY_VERSION = 1  # handover.pt: torch.save({"format": 1, "state_dict": ..., "meta": ...})
MANIFEST_NAME = "handover.json"
DELTA_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.safetensors$")  # a plain name beside the manifest, nothing else


class HandoverWriteError(OSError):
    """A hand-over file could not be written (full disk, quota, I/O error); no partial file is left."""


class HandoverBaseError(ValueError):
    """A hand-over was trained on other base checkpoints than the config builds."""


# ---------------------------------------------------------------------------------------------- what changed


def merged_key(name: str) -> str:
    """The state-dict key a parameter's values end up in once LoRA is merged: peft's wrapper prefix
    (``base_model.model.``) and ``base_layer`` go, a LoRA factor maps to the weight it adapts, an expert
    adapter (``experts.lora.lora_a_in``) to the stacked expert weight (``experts.w_in``)."""
    name = name.replace(".base_model.model.", ".", 1).replace(".base_layer.", ".")
    peft = re.match(r"^(.*)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$", name)
    if peft:
        return f"{peft.group(1)}.weight"
    expert = re.match(r"^(.*\.experts)\.lora\.lora_[ab]_(in|out)$", name)
    if expert:
        return f"{expert.group(1)}.w_{expert.group(2)}"
    return name


def trained_names(model: nn.Module) -> list[str]:
    """The parameters a stage trains (after ``set_trainable``, LoRA adapters in place)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def changed_keys(model: nn.Module, *, trained: Iterable[str], start_keys: Iterable[str]) -> list[str]:
    """Keys of ``model``'s state dict (LoRA adapters in place, not merged) that a stage changed: the parameters
    it trained (LoRA factors among them) and every key whose merged name the model did not have when the stage
    started (modules its structure entries added), plus the keys tied to those (an embedding shared with the
    LM head). A trained name the model lacks is an error: a delta that silently missed a trained weight would
    restore the base value."""
    state = model.state_dict(keep_vars=True)
    start = set(start_keys)
    wanted = {k for k in state if merged_key(k) not in start}
    for name in trained:
        if name not in state:
            raise KeyError(f"trained parameter {name} is not in the model's state dict")
        wanted.add(name)
    storage = {_storage_id(state[k]) for k in wanted}
    wanted |= {k for k, v in state.items() if _storage_id(v) in storage}
    return sorted(wanted)


def _storage_id(tensor: torch.Tensor) -> tuple[int, int]:
    """Where a tensor's values live: tied weights share it. Meta tensors have no storage (``medpipe params
    --handover``): the tensor object itself (``keep_vars`` state dicts hold the shared Parameter)."""
    local = _local(tensor)
    if local.device.type == "meta" or not local.numel():
        return (id(tensor), 0)
    return (local.untyped_storage().data_ptr(), local.storage_offset())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_sharded(tensor: torch.Tensor) -> bool:
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return False
    shards = [p for p in placements if p.is_shard()]
    if any(p.dim != 0 for p in shards):
        raise ValueError(f"hand-over: a parameter sharded on dimension {shards[0].dim} (only FSDP's 0 is supported)")
    return bool(shards)


def base_of(model_cfg: Any) -> dict[str, Any]:
    """The checkpoints the config builds the model from: a delta applies to exactly these."""
    init = model_cfg.get("init")
    grounding = model_cfg.get("grounding")
    return {
        "llm": str(model_cfg.llm.path),
        "vision": str(model_cfg.vision.path),
        "init": None if init is None else {"format": str(init.format), "path": str(init.path)},
        "sam": None if grounding is None else str(grounding.sam_path),
    }


# ---------------------------------------------------------------------------------------------- writing


def _rank_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_handover(
    model: nn.Module,
    path: str | Path,
    *,
    stage: str,
    meta: dict[str, Any] | None = None,
    changed: Iterable[str] | None = None,
    previous: str | Path | None = None,
    base: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    collective: bool = True,
) -> Path:
    """Write ``model``'s hand-over: the manifest at ``path`` (suffix ``.json``) and the delta beside it.

    ``changed``: the keys to hand over (``changed_keys``); None hands over every key (a complete hand-over,
    needing no previous one). ``previous``: the hand-over this stage started from. ``lora``: the stage's LoRA
    settings (``r``, ``alpha``, ``dropout``, ``target_modules``) when ``model`` still holds its adapters
    unmerged: ``restore`` wraps the same adapters, loads the factors and merges. Collective when
    ``torch.distributed`` is initialised: replicated weights (DDP) are written by one process per node; sharded
    ones (FSDP2) by every rank, its own shards, with the manifest from rank 0 (a shared disk); then all wait.
    ``collective=False``: this process alone (a copy made on rank 0). Returns the manifest's path."""
    manifest_path = Path(path).with_suffix(".json")
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    keys = sorted(state) if changed is None else sorted(changed)
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"{manifest_path}: keys to hand over that the model does not have: {missing[:5]}")
    rank, world = _rank_info() if collective else (0, 1)
    sharded = [k for k in keys if _is_sharded(state[k])]
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "stage": stage,
        "complete": changed is None,
        "previous": None if previous is None else _relative(Path(previous), manifest_path.parent),
        "base": base,
        "structure": model_structure(model),
        "lora": lora,
        "meta": meta or {},
        "keys": len(keys),
        "sharded_keys": sharded,
    }
    node = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", "0")))
    if not sharded:  # replicated weights (one process, DDP): one writer per node, so node-local disks work too
        if world == 1 or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            written = _write_delta(
                {k: state[k] for k in keys}, manifest_path.parent / f"{manifest_path.stem}.safetensors", node
            )
            _write_text_atomically(json.dumps({**manifest, "delta": [written]}, indent=1) + "\n", manifest_path, node)
    else:  # FSDP2: every rank its shards (rank 0 also the replicated tensors), rank 0 the manifest: shared disk
        mine = {k: state[k] for k in sharded}
        if rank == 0:
            mine.update({k: state[k] for k in keys if k not in set(sharded)})
        name = f"{manifest_path.stem}-rank{rank:05d}-of-{world:05d}.safetensors"
        files = _gather_objects(_write_delta(mine, manifest_path.parent / name, node))  # names and hashes only
        if rank == 0:
            _write_text_atomically(json.dumps({**manifest, "delta": files}, indent=1) + "\n", manifest_path, node)
    if world > 1:
        torch.distributed.barrier()  # nobody reads the hand-over (next stage, evaluation) before it is complete
    return manifest_path


def _gather_objects(obj: Any) -> list[Any]:
    rank, world = _rank_info()
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def _write_delta(tensors: dict[str, torch.Tensor], path: Path, node: str = "0") -> dict[str, Any]:
    """safetensors of ``tensors`` (local shards, contiguous CPU copies: tied tensors become separate entries),
    written to a temporary file and renamed; returns {file, sha256, bytes}. The bytes go through a Python file,
    flushed and synced, so a full disk or quota is an ``OSError`` with its errno for the one-line message."""
    from safetensors.torch import save

    plain = {k: _local(v).detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    data = save(plain, metadata={"format": FORMAT})
    del plain
    tmp = path.with_suffix(f".tmp{node}")  # each node its own: several may write one shared folder
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise HandoverWriteError(write_failure(path, e)) from None
        raise
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_text_atomically(text: str, path: Path, node: str = "0") -> None:
    tmp = path.with_suffix(f".json.tmp{node}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise HandoverWriteError(write_failure(path, e)) from None


def write_failure(path: Path, error: BaseException) -> str:
    """One line for a failed hand-over write: the file, the reason (an OSError's own, ``no space left on
    device`` for a writer that does not say) and the free space left."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    if isinstance(error, OSError) and error.errno is not None:
        reason = (error.strerror or os.strerror(error.errno)).lower()
    elif isinstance(error, OSError):
        reason = str(error)
    else:
        reason = os.strerror(errno.ENOSPC).lower()  # "no space left on device"
    return f"{path}: writing the hand-over failed: {reason} ({free}); the partial file was removed"


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Link:
    """One hand-over of a chain: its file and its manifest (format 1: the loaded file, state dict included)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def legacy(self) -> bool:
        return self.manifest.get("version") == LEGACY_VERSION


def _not_a_handover(path: Path, field: str, reason: str) -> NotAHandoverError:
    return NotAHandoverError(f"{path}: not a medpipe hand-over: field '{field}': {reason}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A hand-over manifest, checked field by field (one line naming the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over not found")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NotAHandoverError(f"{path}: not a medpipe hand-over: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _not_a_handover(path, "format", f"expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise _not_a_handover(path, "version", f"expected {FORMAT_VERSION}, got {manifest.get('version')!r}")
    structure = manifest.get("structure")
    if not isinstance(structure, list) or not all(isinstance(e, dict) for e in structure):
        raise _not_a_handover(path, "structure", "expected a list of structure entries (objects)")
    delta = manifest.get("delta")
    if not isinstance(delta, list) or not delta:
        raise _not_a_handover(path, "delta", "expected a non-empty list of files")
    for i, entry in enumerate(delta):
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not DELTA_FILE.match(name):  # no folder, no '..': beside the manifest only
            raise _not_a_handover(path, f"delta[{i}].file", f"expected a .safetensors name beside it, got {name!r}")
        if not isinstance(entry.get("sha256"), str):
            raise _not_a_handover(path, f"delta[{i}].sha256", "missing")
    previous = manifest.get("previous")
    if previous is not None and not isinstance(previous, str):
        raise _not_a_handover(path, "previous", f"expected a path or null, got {type(previous).__name__}")
    if not isinstance(manifest.get("sharded_keys", []), list):
        raise _not_a_handover(path, "sharded_keys", "expected a list of keys")
    lora = manifest.get("lora")
    if lora is not None and (
        not isinstance(lora, dict) or not {"r", "alpha", "dropout", "target_modules"} <= set(lora)
    ):
        raise _not_a_handover(path, "lora", "expected null or {r, alpha, dropout, target_modules}")
    return manifest


def _legacy_link(path: Path) -> Link:
    data = check_handover(load_weights(path), path, LEGACY_VERSION)
    meta = data["meta"]
    manifest = {
        "version": LEGACY_VERSION,
        "stage": data.get("stage"),
        "complete": True,
        "previous": None,
        "base": None,
        "structure": list(meta.get("structure", [])),
        "meta": {k: v for k, v in meta.items() if k != "structure"},
        "state_dict": data["state_dict"],
    }
    return Link(path, manifest)


def handover_chain(path: str | Path) -> list[Link]:
    """The hand-overs ``path`` builds on, oldest first, ending with ``path``: ``previous`` links are followed
    until a complete one (or the first stage); a loop or a missing file is an error naming it."""
    path = Path(path)
    chain: list[Link] = []
    seen: set[Path] = set()
    while True:
        if not path.is_file():
            where = f" (named as 'previous' by {chain[-1].path})" if chain else ""
            raise FileNotFoundError(f"{path}: hand-over not found{where}")
        resolved = path.resolve()
        if resolved in seen:
            raise NotAHandoverError(f"{path}: its 'previous' chain loops back to itself")
        seen.add(resolved)
        link = Link(path, read_manifest(path)) if path.suffix == ".json" else _legacy_link(path)
        chain.append(link)
        previous = link.manifest.get("previous")
        if link.manifest.get("complete") or previous is None:
            return chain[::-1]
        path = Path(os.path.normpath(path.parent / previous))  # an absolute `previous` stays as it is


def read_delta(link: Link, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of one hand-over whose key starts with ``prefix`` (shards joined along dimension 0 in rank
    order; only those are loaded); each file's SHA-256 must equal the manifest's."""
    from safetensors import SafetensorError, safe_open

    if link.legacy:
        return {k: v for k, v in link.manifest["state_dict"].items() if k.startswith(prefix)}
    sharded = set(link.manifest.get("sharded_keys", []))
    tensors: dict[str, torch.Tensor] = {}
    shards: dict[str, list[torch.Tensor]] = {}
    for i, entry in enumerate(link.manifest["delta"]):
        file = link.path.parent / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file}: delta named by {link.path} (field 'delta[{i}]') not found")
        if file_sha256(file) != entry["sha256"]:
            raise NotAHandoverError(f"{file}: SHA-256 differs from {link.path}'s field 'delta[{i}].sha256' (changed?)")
        try:
            with safe_open(str(file), "pt") as f:
                loaded = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 (no iter)
        except SafetensorError as e:
            raise NotAHandoverError(f"{file}: not a safetensors file ({e})") from None
        for key, value in loaded.items():
            if key in sharded:
                shards.setdefault(key, []).append(value)
            else:
                tensors[key] = value
    for key, parts in shards.items():
        tensors[key] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return tensors


def load_handover(path: str | Path, prefix: str = "") -> dict[str, Any]:
    """A hand-over chain as one: ``stage``, ``meta`` (``structure`` included) of the newest, and the
    ``state_dict`` of every delta of the chain (its keys starting with ``prefix``), newer values over older
    ones (a delta, not the full model)."""
    chain = handover_chain(path)
    state: dict[str, torch.Tensor] = {}
    for link in chain:
        state.update(read_delta(link, prefix))
    last = chain[-1].manifest
    return {
        "stage": last.get("stage"),
        "meta": {**last.get("meta", {}), "structure": list(last["structure"])},
        "base": last.get("base"),
        "state_dict": state,
    }


def handover_structure(path: str | Path) -> list[dict[str, Any]]:
    """The structure entries a hand-over records, without reading its weights (format 1: memory-mapped)."""
    path = Path(path)
    if path.suffix == ".json":
        return list(read_manifest(path)["structure"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hand-over not found")
    data = check_handover(load_weights(path, mmap=True), path, LEGACY_VERSION)
    return list(data["meta"].get("structure", []))


def check_base(chain: list[Link], base: dict[str, Any] | None) -> None:
    """Every delta of the chain was trained on the checkpoints ``base`` names (what the config builds)."""
    if base is None:
        return
    for link in chain:
        recorded = link.manifest.get("base")
        if recorded is None:
            continue  # format 1, or written without a base: nothing to compare
        differs = [k for k in sorted(set(recorded) | set(base)) if recorded.get(k) != base.get(k)]
        if differs:
            key = differs[0]
            raise HandoverBaseError(
                f"{link.path}: trained on model.{'llm.path' if key == 'llm' else key} {recorded.get(key)!r}, "
                f"but the config builds {base.get(key)!r}: a delta only applies to its own base checkpoints"
            )


def restore(model: nn.Module, path: str | Path, *, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the hand-over chain ending at ``path`` into ``model`` (built from the config). For each hand-over,
    oldest first: replay its structure entries, wrap its LoRA adapters, load its delta, merge the adapters.
    A key the model lacks, a shape that differs, or a key a structure entry added that no delta fills is an
    error naming the file and the key. ``base``: ``base_of(cfg.model)``, checked against each manifest's."""
    from omegaconf import OmegaConf

    from pipeline.trainable import add_lora, merge_lora

    path = Path(path)
    chain = handover_chain(path)
    check_base(chain, base)
    unfilled: set[str] = set()  # keys structure entries added that no delta has filled yet
    for link in chain:
        before = set(model.state_dict())
        apply_structure(model, link.manifest["structure"], source=str(link.path))
        unfilled |= set(model.state_dict()) - before
        lora = link.manifest.get("lora")
        if lora is not None:
            with torch.random.fork_rng(devices=[]):  # the adapters' init is overwritten: leave the RNG as it was
                add_lora(model, OmegaConf.create(lora))
        own = model.state_dict()
        delta = read_delta(link)
        unexpected = sorted(k for k in delta if k not in own)
        # a complete hand-over (format 1, `register_weights: full`) holds every weight
        missing = sorted(set(own) - set(delta) - _tied_to(own, delta)) if link.manifest.get("complete") else []
        if unexpected or missing:
            raise ValueError(
                f"{link.path}: weights do not fit the model built from the config: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, value in delta.items():
            if own[key].shape != value.shape:
                raise ValueError(
                    f"{link.path}: weights do not fit the model built from the config: {key} has shape "
                    f"{tuple(value.shape)} in the file and {tuple(own[key].shape)} in the model"
                )
        model.load_state_dict(delta, strict=False)
        filled = {merged_key(k) for k in delta}
        if lora is not None:
            merge_lora(model)
        merged = model.state_dict()
        unfilled -= filled | _tied_to(merged, filled & set(merged))
    if unfilled:
        raise ValueError(
            f"{path}: no hand-over of the chain holds {sorted(unfilled)[:5]}, which its structure entries add "
            "(a delta written without the new modules?)"
        )
    last = chain[-1].manifest
    return {"stage": last.get("stage"), "meta": {**last.get("meta", {}), "structure": list(last["structure"])}}


def _tied_to(state: dict[str, torch.Tensor], keys: Iterable[str]) -> set[str]:
    """Keys of ``state`` sharing storage with one of ``keys`` (tied embeddings)."""
    storage = {_storage_id(state[k]) for k in keys if k in state}
    return {k for k, v in state.items() if _storage_id(v) in storage}


# ---------------------------------------------------------------------------------------------- copies


def handover_bytes(path: str | Path) -> dict[str, int]:
    """Bytes on disk: ``own`` (this hand-over's manifest and delta) and ``chain`` (every link's)."""
    chain = handover_chain(path)
    sizes = [
        link.path.stat().st_size
        + sum((link.path.parent / e["file"]).stat().st_size for e in link.manifest.get("delta", []))
        for link in chain
    ]
    return {"own": sizes[-1], "chain": sum(sizes)}


def copy_chain(path: str | Path, dst: str | Path, *, complete: bool = False, model: nn.Module | None = None) -> Path:
    """The hand-over chain ending at ``path`` as a self-contained folder ``dst`` (what the registry logs):
    the last link at ``dst/handover.json``, earlier links under ``dst/previous/<k>-<stage>/``, manifests
    rewritten to point at each other. ``complete=True``: one hand-over holding every weight of ``model``
    (restored from ``path``) instead. Returns the manifest's path."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    chain = handover_chain(path)
    if complete:
        if model is None:
            raise ValueError("copy_chain(complete=True) needs the restored model")
        last = chain[-1].manifest
        return save_handover(
            model,
            dst / MANIFEST_NAME,
            stage=str(last.get("stage")),
            meta=last.get("meta", {}),
            base=last.get("base"),
            collective=False,
        )
    previous: str | None = None
    for k, link in enumerate(chain):
        folder = dst if k == len(chain) - 1 else dst / "previous" / f"{k}-{link.manifest.get('stage')}"
        folder.mkdir(parents=True, exist_ok=True)
        if link.legacy:  # a format-1 file: as it is
            target = folder / link.path.name
            shutil.copyfile(link.path, target)
        else:
            for entry in link.manifest["delta"]:
                shutil.copyfile(link.path.parent / entry["file"], folder / entry["file"])
            manifest = {**link.manifest, "previous": None if previous is None else _relative(Path(previous), folder)}
            target = folder / MANIFEST_NAME
            target.write_text(json.dumps(manifest, indent=1) + "\n")
        previous = str(target)
    return dst / (MANIFEST_NAME if not chain[-1].legacy else chain[-1].path.name)
