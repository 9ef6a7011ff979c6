"""Uni-Med's checkpoint (a MiniGPT-v2-style ``.pth``) into medpipe's CMoE connector, with its LoRA merged into
the LLM.

Sources read (``Uni-Med`` = github.com/tsinghua-msiip/Uni-Med@63b9dfb):

- ``uni_med/runners/runner_base.py:575-600`` (``_save_checkpoint``): ``torch.save({"model": state_dict, "optimizer",
  "config": the training config as a dict, "scaler", "epoch"})``, where ``state_dict`` is the model's
  ``state_dict()`` less every *parameter* that does not require a gradient. Kept, therefore: the trainable
  parameters, the buffers (``rotary_emb.inv_freq`` of transformers 4.30's Llama, ``environment.yml`` pins 4.30.0),
  and the second name of a module registered twice (``named_parameters`` lists it once, ``state_dict`` twice).
  The frozen LLM base, EVA ViT-g and ``ln_vision`` are not in it: they come from ``model.llm.path``,
  ``model.vision`` and ``model.vision.output_norm`` (a fresh LayerNorm, as Uni-Med's is never trained).
- ``uni_med/models/uni_med.py:83-155`` (``projector_type: moe_mlp``, ``train_configs/uni_med.yaml:15-21``):
  ``task_tokens.{vqa,refer,identify,caption,cls}`` (``(1, num_task_tokens, task_token_c)``), the experts
  ``moe_layers.{e}.{0,2}`` (``Linear(in, d)``, GELU, ``Linear(d, d)``), the same modules again as
  ``llm_proj.{e}.{0,2}`` (``self.llm_proj = self.moe_layers``), the router ``router.fc1`` / ``router.fc2``
  (``Mlp(task_token_c + in, 4 (task_token_c + in), E)``, lines 135-137, 322-339), whose input is
  ``cat([task token, visual token])`` (task first, line 188).
- ``uni_med/models/base_model.py:194-229``: the LLM wrapped by peft (0.7.1) ``get_peft_model`` as ``llm_model``:
  LoRA keys ``llm_model.base_model.model.<module>.lora_A.default.weight`` (r, in) and ``lora_B`` (out, r),
  ``LoraConfig(r=lora_r, lora_alpha=lora_alpha)`` (scale ``lora_alpha / r``) on every Linear but ``lm_head``
  (``lora_target_modules: ['all']``, ``find_all_linear_names``, lines 30-49).

How it maps (the checkpoint's ``config`` must be present: it holds ``lora_alpha`` and the connector settings,
each checked against the ``model.connector`` / ``model.vision`` key it corresponds to):

    moe_layers.{e}.0 / .2                   -> connector.experts (expert e: w_in = fc1.T, w_out = fc2.T, biases)
    router.fc1.weight [task | token]        -> connector.router.fc1_task.weight | fc1_token.weight (column blocks)
    router.fc1.bias, router.fc2.*           -> connector.router.fc1_token.bias, connector.router.fc2.*
    task_tokens.<task>                      -> connector.router.task_embedding row TASK_IDS[<task>]
    llm_model.base_model.model.<m>.lora_A/B -> merged: llm.<m>.weight += lora_alpha / r * B @ A

Left out, with the reason in the import report: ``llm_proj.*`` (the same tensors as ``moe_layers.*``), rotary
buffers; with ``hard`` / ``constant`` weighting the router and task tokens (trained by nothing: Uni-Med builds the
router for every ``moe_*`` projector, line 135, but only the soft / sparse weightings read it). The task embedding
rows of tasks Uni-Med has no token for (medpipe's ``qa``, ``region``, ``grounding``) keep their initialisation,
noted in the report (``qa`` is text-only: no image ever reads it).

UNVERIFIED (no released checkpoint was downloaded; the key names are read from the code that writes them):
whether a released file keeps the ``optimizer`` / ``scaler`` entries (ignored either way) and the 4.30 rotary
buffers (ignored either way).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.specs import TASK_IDS
from pipeline.importers.checkpoints import checkpoint_files
from pipeline.importers.keymap import CheckpointLayoutError, ImportReport, Rule
from pipeline.importers.moe_llava import ROTARY, TargetViews, grouped_views

UNI_MED_TASKS = ("vqa", "refer", "identify", "caption", "cls")  # models/uni_med.py:84
ROUTER_INPUTS = {"router_task_token": "task_token", "router_token": "token", "router_task": "task"}
AGGREGATIONS = {"projection": "concat4", "avgpool": "avgpool", "maxpool": "maxpool"}
LORA = r"llm_model\.base_model\.model\.(.+)\.lora_{}(?:\.default)?\.weight"
FC1 = "connector.router.fc1@uni_med."  # the router's first Linear over [task | token], split when assembled
TASK_TOKEN = "connector.router.task_embedding@task."  # one task token, written into its task's row


def rules_for(model_cfg: Any) -> list[Rule]:
    routed = model_cfg.connector.weighting in ("soft", "sparse")
    unused = f"unused with model.connector.weighting {model_cfg.connector.weighting!r} (no router)"
    tasks = rf"task_tokens\.({'|'.join(UNI_MED_TASKS)})"
    router = (
        [
            Rule(r"router\.fc1\.(weight|bias)", FC1 + r"\1"),
            Rule(r"router\.fc2\.(weight|bias)", r"connector.router.fc2.\1"),
            Rule(tasks, TASK_TOKEN + r"\1")
            if model_cfg.connector.router_input != "token"
            else Rule(tasks, None, "the task tokens: unused by router_method router_token (models/uni_med.py:197)"),
        ]
        if routed
        else [
            Rule(r"router\.fc[12]\.(?:weight|bias)", None, "the router: " + unused),
            Rule(rf"task_tokens\.(?:{'|'.join(UNI_MED_TASKS)})", None, "the task tokens: " + unused),
        ]
    )
    return [
        Rule(r"moe_layers\.(\d+)\.0\.(weight|bias)", r"connector.experts.\1.fc1.\2"),
        Rule(r"moe_layers\.(\d+)\.2\.(weight|bias)", r"connector.experts.\1.fc2.\2"),
        Rule(
            r"llm_proj\.\d+\.[02]\.(?:weight|bias)",
            None,
            "the same tensors as moe_layers.* (llm_proj = moe_layers, models/uni_med.py:133,155)",
        ),
        *router,
        Rule(LORA.format("A"), r"llm.\1.weight@lora_A"),
        Rule(LORA.format("B"), r"llm.\1.weight@lora_B"),
        ROTARY,
    ]


def _training_config(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping):
        raise CheckpointLayoutError(
            f"{path}: no training config in the checkpoint ('config': {{'model': ...}}, as _save_checkpoint writes "
            "it); it holds lora_alpha and the connector settings"
        )
    return dict(model)


class UniMedLayout:
    """``model.init: {format: uni_med, path: <checkpoint_*.pth>}`` (module docstring)."""

    name = "uni_med"

    def read_config(self, path: Path) -> dict[str, Any]:
        """The training config saved beside the weights (``{}`` when the file has none)."""
        file = checkpoint_files(path)[0]
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - any reader failure is this file's problem, in one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointLayoutError(f"{file}: cannot read the checkpoint: {first}") from None
        config = saved.get("config") if isinstance(saved, dict) else None
        return dict(config) if isinstance(config, Mapping) else {}

    def llm_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return None  # the LLM is a plain checkpoint folder (model.llm.path)

    def vision_config_dict(self, config: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def parts(self, keys: list[str]) -> set[str]:
        return {"connector"}

    def check_settings(self, config: dict[str, Any], model_cfg: Any, path: Path, keys: list[str]) -> None:
        saved = _training_config(config, path)
        if not saved.get("has_moe") or saved.get("projector_type") != "moe_mlp":
            raise CheckpointLayoutError(
                f"{path}: has_moe {saved.get('has_moe')!r}, projector_type {saved.get('projector_type')!r}; medpipe "
                "imports Uni-Med's connector mixture-of-experts (has_moe: true, projector_type: moe_mlp)"
            )
        connector, vision = model_cfg.connector, model_cfg.vision
        if connector.type != "cmoe":
            raise CheckpointLayoutError(f"model.connector.type: {connector.type!r}, but {path} has a CMoE (set cmoe)")
        weighting = saved.get("router_type", "soft")
        router_input = ROUTER_INPUTS.get(saved.get("router_method", "router_task_token"), "?")
        aggregation = AGGREGATIONS.get(saved.get("resample_method", "projection"), "?")
        expected = {
            "model.connector.num_experts": (int(saved.get("num_experts", 3)), connector.num_experts, "num_experts"),
            "model.connector.weighting": (weighting, connector.weighting, "router_type"),
            "model.connector.aggregation": (aggregation, connector.aggregation, "resample_method"),
            "model.connector.router_hidden_ratio": (4.0, float(connector.router_hidden_ratio), "Mlp(..., 4 x in)"),
            "model.vision.output_norm": (True, bool(vision.get("output_norm", False)), "ln_vision"),
            "model.vision.select_feature": ("patch", vision.select_feature, "image_embeds[:, 1:]"),
        }
        if weighting in ("soft", "sparse"):
            expected["model.connector.router_input"] = (router_input, connector.router_input, "router_method")
        if weighting in ("soft", "sparse") and router_input != "token":  # null would be medpipe's min(768, in)
            expected["model.connector.task_embed_dim"] = (
                int(saved.get("task_token_c", 768)),
                connector.task_embed_dim,
                "task_token_c",
            )
        if weighting == "sparse":
            expected["model.connector.top_k"] = (int(saved.get("sparse_topk", 2)), connector.top_k, "sparse_topk")
        if aggregation == "concat4" and int(saved.get("resample_rate", 4)) != 4:
            raise CheckpointLayoutError(f"{path}: resample_rate {saved['resample_rate']}; medpipe's concat4 joins 4")
        for key, (value, actual, source) in expected.items():
            if actual != value:
                raise CheckpointLayoutError(
                    f"{key}: {actual!r}, but {path} has {source} = {saved.get(source, value)!r} (set {key}: {value!r})"
                )
        if weighting in ("soft", "sparse") and router_input != "token":
            if int(saved.get("num_task_tokens", 10)) != 1:
                raise CheckpointLayoutError(
                    f"{path}: num_task_tokens {saved.get('num_task_tokens')}; medpipe's CMoE has one embedding per task"
                )
            short = [t for t in UNI_MED_TASKS if TASK_IDS[t] >= connector.num_tasks]
            if short:
                raise CheckpointLayoutError(
                    f"model.connector.num_tasks: {connector.num_tasks}, but {path} has task tokens for {short} "
                    f"(task ids {[TASK_IDS[t] for t in short]}): set model.connector.num_tasks >= "
                    f"{max(TASK_IDS[t] for t in UNI_MED_TASKS) + 1}"
                )
        if any(".lora_A." in k for k in keys) and "lora_alpha" not in saved:
            raise CheckpointLayoutError(f"{path}: LoRA weights but no lora_alpha in its config (the merge scale)")

    def structure(self, config: dict[str, Any], keys: list[str], path: Path) -> list[dict[str, Any]]:
        return []

    def rules(self, config: dict[str, Any], model_cfg: Any) -> list[Rule]:
        return rules_for(model_cfg)

    def views(self, model: nn.Module, source: Mapping[str, torch.Tensor], config: dict[str, Any]) -> TargetViews:
        connector = model.connector
        views = grouped_views(connector.experts, "connector.experts")
        if connector.router is not None:
            views.merge(_router_views(connector.router))
        saved = config.get("model", {}) if isinstance(config, Mapping) else {}
        return views.merge(_lora_views(model, source, saved))


def _meta(shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device="meta")


def _router_views(router: nn.Module) -> TargetViews:
    """Uni-Med's ``router.fc1`` over ``[task token | visual token]`` as medpipe's two column blocks, and its task
    tokens as rows of the task embedding table."""
    views = TargetViews()
    prefix = "connector.router."
    token, task = router.fc1_token, router.fc1_task
    hidden = (token or task).out_features
    width = (token.in_features if token is not None else 0) + (task.in_features if task is not None else 0)
    like = (token or task).weight
    views.virtual[FC1 + "weight"] = _meta((hidden, width), like)
    views.virtual[FC1 + "bias"] = _meta((hidden,), like)
    views.replaced |= {f"{prefix}fc1_{part}.{p}" for part in ("token", "task") for p in ("weight", "bias")}
    table = None
    if router.uses_tasks:
        table = router.task_embedding.weight
        views.replaced.add(f"{prefix}task_embedding.weight")
        for name in UNI_MED_TASKS:
            views.virtual[TASK_TOKEN + name] = _meta((1, 1, table.shape[1]), table)

    def build(mapped: dict[str, torch.Tensor], report: ImportReport) -> None:
        weight, bias = mapped[FC1 + "weight"], mapped[FC1 + "bias"]
        task_width = task.in_features if task is not None else 0
        if task is not None:  # the task token comes first in Uni-Med's concatenation (models/uni_med.py:188)
            mapped[f"{prefix}fc1_task.weight"] = weight[:, :task_width]
        if token is not None:
            mapped[f"{prefix}fc1_token.weight"] = weight[:, task_width:]
            mapped[f"{prefix}fc1_token.bias"] = bias
        else:
            mapped[f"{prefix}fc1_task.bias"] = bias
        if table is not None:
            rows = table.detach().clone()
            for name in UNI_MED_TASKS:
                rows[TASK_IDS[name]] = mapped[TASK_TOKEN + name][0, 0].to(rows.dtype)
            kept = [t for t, i in sorted(TASK_IDS.items(), key=lambda kv: kv[1]) if i < rows.shape[0]]
            kept = [t for t in kept if t not in UNI_MED_TASKS]
            if kept:
                report.notes.append(f"task embedding rows of {kept}: no Uni-Med task token, medpipe's initialisation")
            mapped[f"{prefix}task_embedding.weight"] = rows

    views.builders.append(build)
    return views


def _lora_views(model: nn.Module, source: Mapping[str, torch.Tensor], saved: Mapping[str, Any]) -> TargetViews:
    """Each LoRA pair of the checkpoint seen as ``llm.<module>.weight@lora_A`` (r, in) / ``@lora_B`` (out, r),
    both required; assembled as the module's weight plus ``lora_alpha / r * B @ A`` (computed in float32)."""
    import re

    views = TargetViews()
    targets = model.state_dict()
    pattern = re.compile(LORA.format("A"))
    modules = []
    for key, a in source.items():
        match = pattern.fullmatch(key)
        if match is None:
            continue
        name = f"llm.{match.group(1)}.weight"
        if name not in targets:
            continue  # the rule maps it onto a key the model does not have: named by the key mapping
        weight = targets[name]
        rank = a.shape[0]
        views.virtual[f"{name}@lora_A"] = _meta((rank, weight.shape[1]), weight)
        views.virtual[f"{name}@lora_B"] = _meta((weight.shape[0], rank), weight)
        views.required |= {f"{name}@lora_A", f"{name}@lora_B"}
        modules.append((name, weight, rank))
    alpha = saved.get("lora_alpha")
    configured = saved.get("lora_r")

    def build(mapped: dict[str, torch.Tensor], report: ImportReport) -> None:
        for name, weight, rank in modules:
            if configured is not None and int(configured) != rank:
                raise CheckpointLayoutError(f"{report.source}: {name}: LoRA rank {rank}, its config says {configured}")
            a, b = mapped[f"{name}@lora_A"].float(), mapped[f"{name}@lora_B"].float()  # (r, in), (out, r)
            scale = float(alpha) / rank
            mapped[name] = (weight.float() + scale * (b @ a)).to(weight.dtype)  # (out, in)
            mapped.pop(f"{name}@lora_A")
            mapped.pop(f"{name}@lora_B")
        if modules:
            report.notes.append(f"LoRA merged into {len(modules)} LLM weights (scale lora_alpha / r = {alpha}/{rank})")

    views.builders.append(build)
    return views


LAYOUT = UniMedLayout()
