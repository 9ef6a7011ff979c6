"""MoE-LLaVA / Med-MoE stage-3 checkpoints imported into medpipe's MoE model: every key accounted for, the MoE
structure the checkpoint's config describes, and the logits of a re-implementation of the released forward.

The sources are tiny folders written here as ``save_pretrained`` of ``MoELLaVA<LLM>ForCausalLM`` writes them
(random weights, the real key names and config fields): the LLM's keys, ``model.mm_projector.image_spatial_proj.*``,
optionally ``model.image_tower.image_tower.*``, and in the MoE layers DeepSpeed's ``mlp.deepspeed_moe.gate.wg``
and ``mlp.deepspeed_moe.experts.deepspeed_experts.{e}.*`` plus, for Med-MoE, the meta expert ``mlp.meta_moe.*``.
The reference is independent of medpipe's MoE code: transformers' dense LLM whose MoE layers are replaced by a
token-by-token loop of the released gate (``moe/sharded_moe.py`` top1gating / top2gating without drops): softmax
over the router's logits, the top-1 (or top-2, renormalised) experts weighted by their probabilities, plus the
meta expert.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from import_helpers import copy_tokenizer, image, ours_logits, random_clip
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
EXPERTS = "mlp.deepspeed_moe.experts.deepspeed_experts"


def _legacy_rope(config: dict) -> dict:
    """transformers 4.37's config fields (what the released config.json has): rope at the top level."""
    fields = {k: v for k, v in config.items() if k not in ("rope_parameters", "transformers_version", "dtype")}
    rope = config.get("rope_parameters") or {}
    if "partial_rotary_factor" in rope:
        fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    return fields


def _epoch_config(config: dict) -> dict:
    """StableLM-2 as Med-MoE's StableLMEpochConfig names its fields (configuration_stablelm_epoch.py)."""
    fields = _legacy_rope(config)
    fields["rope_pct"] = fields.pop("partial_rotary_factor")
    fields["norm_eps"] = fields.pop("layer_norm_eps")
    for key in ("qk_layernorm", "use_parallel_residual", "hidden_dropout"):
        fields.pop(key, None)
    return fields


def write_moe_llava(
    root: Path,
    clip_dir: Path,
    llm_dir: Path,
    *,
    kind: str,
    layers: list[int],
    num_experts: int = 4,
    top_k: int = 1,
    meta: bool = True,
    router_bias: bool = True,
    with_vision: bool = False,
    epoch_config: bool = False,
    extra_moe: dict | None = None,
    dense: bool = False,
) -> Path:
    """A MoE-LLaVA stage-3 folder at tiny size: Med-MoE (meta expert, router with bias) or MoE-LLaVA (neither);
    ``dense``: the stage-2 model (``llava_<llm>``, no ``moe``; ``layers`` empty)."""
    from transformers import AutoModelForCausalLM

    out = root / f"moe-llava-{kind}"
    out.mkdir()
    llm_config = json.loads((llm_dir / "config.json").read_text())
    torch.manual_seed(1)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    clip = random_clip(clip_dir, seed=2)
    d_vision, d_llm = clip.config.hidden_size, llm.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    state = {}
    for key, value in llm.state_dict().items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if layer is not None and int(layer) in layers and ".mlp." in key:
            continue  # the dense FFN of a MoE layer: its copies follow
        state[key] = value.clone()
    for index in layers:
        mlp = llm.model.layers[index].mlp
        prefix = f"model.layers.{index}.mlp"
        for name, value in mlp.state_dict().items():
            for e in range(num_experts):  # each expert its own weights (a trained MoE's experts differ)
                noise = torch.randn(value.shape, generator=generator) * 0.2
                state[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{e}.{name}"] = value + noise
            if meta:
                state[f"{prefix}.meta_moe.{name}"] = value + torch.randn(value.shape, generator=generator) * 0.2
        state[f"{prefix}.deepspeed_moe.gate.wg.weight"] = torch.randn(num_experts, d_llm, generator=generator)
        if router_bias:
            state[f"{prefix}.deepspeed_moe.gate.wg.bias"] = torch.randn(num_experts, generator=generator)
    projector = "model.mm_projector.image_spatial_proj"
    state[f"{projector}.0.weight"] = torch.randn(d_llm, d_vision, generator=generator) * 0.1
    state[f"{projector}.0.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state[f"{projector}.2.weight"] = torch.randn(d_llm, d_llm, generator=generator) * 0.1
    state[f"{projector}.2.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    if with_vision:  # transformers 4.37: CLIPVisionModel's parameters under vision_model.
        state.update(
            {f"model.image_tower.image_tower.vision_model.{k}": v.clone() for k, v in clip.state_dict().items()}
        )
    save_file(state, str(out / "model.safetensors"))
    base = _epoch_config(llm_config) if epoch_config else _legacy_rope(llm_config)
    moe = {
        "moe_enable": True,
        "moe_mode": "custom",
        "moe_layers_idx": layers,
        "ep_size": 1,
        "top_k_experts": top_k,
        "capacity_factor": 1.5,
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
        "use_residual": False,
        "router_aux_loss_coef": 0.0 if meta else 0.01,
        "train_modules": ["fc1", "fc2", "wg"],
        "num_experts": [num_experts] * len(layers),
        **(extra_moe or {}),
    }
    fields = {
        **base,
        "model_type": f"llava_{kind}" if dense else f"moe_llava_{kind}",
        "architectures": [
            f"Llava{kind.capitalize()}ForCausalLM" if dense else f"MoELLaVA{kind.capitalize()}ForCausalLM"
        ],
        **({} if dense else {"moe": moe}),
        "mm_image_tower": str(clip_dir),
        "mm_video_tower": None,
        "image_projector_type": "mlp2x_gelu",
        "video_projector_type": "linear",
        "mm_hidden_size": d_vision,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "use_mm_proj": True,
    }
    (out / "config.json").write_text(json.dumps(fields))
    copy_tokenizer(llm_dir, out)
    return out


class ReferenceMoE(nn.Module):
    """DeepSpeed's MoE layer as Med-MoE / MoE-LLaVA run it, dropless, one token at a time: softmax of ``wg``,
    top-1 (weight = its probability) or top-2 (weights renormalised over the two), plus the meta expert."""

    def __init__(self, wg: nn.Linear, experts: list[nn.Module], meta: nn.Module | None, top_k: int) -> None:
        super().__init__()
        self.wg, self.experts, self.meta, self.top_k = wg, nn.ModuleList(experts), meta, top_k
        self.chosen: list[int] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        rows = hidden.reshape(-1, hidden.shape[-1])
        out = []
        for x in rows:  # (D,)
            probs = torch.softmax(self.wg(x.float()), dim=-1)  # (E,)
            order = torch.argsort(probs, descending=True)[: self.top_k].tolist()
            weights = probs[order] / (probs[order].sum() if self.top_k == 2 else 1.0)
            y = sum(w * self.experts[e](x[None])[0] for w, e in zip(weights, order, strict=True))
            if self.meta is not None:
                y = y + self.meta(x[None])[0]
            self.chosen += order
            out.append(y)
        return torch.stack(out).view(hidden.shape)


def reference_llm(folder: Path, llm_dir: Path):
    """transformers' LLM on the folder's tensors with its MoE layers as :class:`ReferenceMoE`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = load_file(str(folder / "model.safetensors"))
    moe = json.loads((folder / "config.json").read_text()).get("moe", {"moe_layers_idx": [], "num_experts": []})
    llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_dir)).eval()
    dense = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.image_tower"))}
    dense = {k: v for k, v in dense.items() if ".deepspeed_moe." not in k and ".meta_moe." not in k}
    missing, unexpected = llm.load_state_dict(dense, strict=False)
    assert not unexpected and all(int(k.split(".")[2]) in moe["moe_layers_idx"] for k in missing)
    for index, num_experts in zip(moe["moe_layers_idx"], moe["num_experts"], strict=True):
        prefix = f"model.layers.{index}.mlp"
        template = llm.model.layers[index].mlp

        def ffn(name: str, template=template, prefix=prefix) -> nn.Module:
            module = copy.deepcopy(template)
            module.load_state_dict({k.removeprefix(f"{prefix}.{name}."): v for k, v in state.items()
                                    if k.startswith(f"{prefix}.{name}.")})  # fmt: skip
            return module

        weight, bias = (
            state[f"{prefix}.deepspeed_moe.gate.wg.weight"],
            state.get(f"{prefix}.deepspeed_moe.gate.wg.bias"),
        )
        wg = nn.Linear(weight.shape[1], num_experts, bias=bias is not None)  # Med-MoE: with bias, DeepSpeed: none
        wg.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
        experts = [ffn(f"deepspeed_moe.experts.deepspeed_experts.{e}") for e in range(num_experts)]
        meta = ffn("meta_moe") if f"{prefix}.meta_moe.{next(iter(template.state_dict()))}" in state else None
        llm.model.layers[index].mlp = ReferenceMoE(wg, experts, meta, moe["top_k_experts"])
    return llm, state


def _cfg(tmp: Path, folder: Path, clip_dir: Path, *overrides: str):
    return load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={tmp}/out",
            "model.connector.type=mlp",
            "model.connector.aggregation=none",
            "model.vision.select_layer=-2",
            "model.vision.pad_square=true",
            f"model.vision.path={clip_dir}",
            f"model.llm.path={folder}",
            f"model.init={{format: moe_llava, path: {folder}}}",
            *overrides,
        ],
        check_paths=False,
    )


def _reference_logits(folder: Path, llm_dir: Path, clip_dir: Path, pixels, prefix, suffix, *, with_vision: bool):
    from transformers import CLIPVisionModel

    llm, state = reference_llm(folder, llm_dir)
    tower = "model.image_tower.image_tower.vision_model."
    if with_vision:
        clip = random_clip(clip_dir, seed=0)
        clip.load_state_dict({k.removeprefix(tower): v for k, v in state.items() if k.startswith(tower)})
    else:
        clip = CLIPVisionModel.from_pretrained(clip_dir).eval()  # mm_image_tower
    projector = "model.mm_projector.image_spatial_proj"
    with torch.no_grad():
        features = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, P, Dv)
        hidden = torch.nn.functional.gelu(
            torch.nn.functional.linear(features, state[f"{projector}.0.weight"], state[f"{projector}.0.bias"])
        )  # (1, P, D)
        projected = torch.nn.functional.linear(hidden, state[f"{projector}.2.weight"], state[f"{projector}.2.bias"])
        embed = llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor([prefix])), projected, embed(torch.tensor([suffix]))], dim=1)
        logits = llm(inputs_embeds=embeds).logits[0]  # (T, V_src)
    chosen = [e for layer in llm.model.layers if isinstance(layer.mlp, ReferenceMoE) for e in layer.mlp.chosen]
    return logits, chosen


@pytest.mark.parametrize(
    ("family", "kind", "with_vision", "epoch_config"),
    [("phi2", "phi", True, False), ("stablelm2", "stablelm", False, True)],
    ids=["med-moe-phi2-with-tower", "med-moe-stablelm2-epoch-config"],
)
def test_med_moe_equals_its_own_forward(tmp_path, tiny_clip, cache_dir, family, kind, with_vision, epoch_config):
    from pipeline.structure import model_structure
    from pipeline.zoo import ensure_tiny

    llm_dir = ensure_tiny(family, cache_dir)
    folder = write_moe_llava(
        tmp_path, tiny_clip, llm_dir, kind=kind, layers=[0, 1], with_vision=with_vision, epoch_config=epoch_config
    )
    built = build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    (entry,) = model_structure(built.model)
    assert entry["layers"] == [0, 1] and entry["num_experts"] == 4 and entry["top_k"] == 1
    assert entry["meta_expert"] and entry["router_bias"] and not entry["renormalize"]
    assert entry["capacity_factor"] is None  # Med-MoE hard-codes drop_tokens=False: dropless
    pixels, prefix, suffix = image(), [1, 5, 9], [11, 12, 13]
    reference, chosen = _reference_logits(folder, llm_dir, tiny_clip, pixels, prefix, suffix, with_vision=with_vision)
    assert len(set(chosen)) > 1  # the tokens do not all go to one expert: routing is exercised
    ours = ours_logits(built, prefix, suffix, pixels)  # (T, V_src + added tokens)
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)


def test_moe_llava_top2_without_meta_equals_its_own_forward(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from pipeline.structure import model_structure

    folder = write_moe_llava(
        tmp_path, tiny_clip, tiny_llama, kind="llama", layers=[0], top_k=2, meta=False, router_bias=False
    )
    built = build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    (entry,) = model_structure(built.model)
    assert entry["layers"] == [0] and entry["top_k"] == 2 and entry["renormalize"]
    assert not entry["meta_expert"] and not entry["router_bias"]
    # DeepSpeed 0.9.5's capacity from the config; with 4 experts, top-2 and eval factor 2 nothing is dropped
    assert (entry["capacity_factor"], entry["eval_capacity_factor"], entry["drop_policy"]) == (1.5, 2.0, "position")
    assert entry["capacity_counts_padding"] and entry["aux_loss_coef"] == 0.01
    pixels, prefix, suffix = image(7), [1, 5, 9], [11, 12]
    reference, chosen = _reference_logits(folder, tiny_llama, tiny_clip, pixels, prefix, suffix, with_vision=False)
    assert len(set(chosen)) > 2
    ours = ours_logits(built, prefix, suffix, pixels)
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)


def test_dense_stage2_folder_imports_without_moe(tmp_path, tiny_clip, cache_dir) -> None:
    """Med-MoE's stage-2 model (llava_phi, MoE-LLaVA's layout without MoE layers) imports as a dense model."""
    from pipeline.structure import model_structure
    from pipeline.zoo import ensure_tiny

    llm_dir = ensure_tiny("phi2", cache_dir)
    folder = write_moe_llava(tmp_path, tiny_clip, llm_dir, kind="phi", layers=[], dense=True)
    built = build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    assert model_structure(built.model) == []
    pixels, prefix, suffix = image(9), [1, 5, 9], [11, 12]
    reference, _ = _reference_logits(folder, llm_dir, tiny_clip, pixels, prefix, suffix, with_vision=False)
    ours = ours_logits(built, prefix, suffix, pixels)
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)


def test_the_imported_structure_survives_a_handover(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    """A stage starting from the imported model hands over its MoE layers; the next build (which imports
    again) restores the hand-over on top, as run_stage does."""
    from pipeline.handover import restore, save_handover

    folder = write_moe_llava(tmp_path, tiny_clip, tiny_llama, kind="llama", layers=[1])
    cfg = _cfg(tmp_path, folder, tiny_clip)
    first = build_model(cfg.model, cache_dir=cache_dir)
    with torch.no_grad():
        first.model.llm.model.layers[1].mlp.experts.w_out.mul_(1.5)  # what a stage would change
    handover = save_handover(first.model, tmp_path / "handover.json", stage="moe", meta={})
    second = build_model(cfg.model, cache_dir=cache_dir)
    restore(second.model, handover)
    pixels = image(8)
    torch.testing.assert_close(ours_logits(second, [1, 2], [3], pixels), ours_logits(first, [1, 2], [3], pixels))


def test_params_without_weights_have_the_checkpoints_moe_layers(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from lightningmodules.models.moe import moe_layers

    folder = write_moe_llava(tmp_path, tiny_clip, tiny_llama, kind="llama", layers=[0, 1], num_experts=3)
    built = build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir, weights="none")
    layers = moe_layers(built.model)
    assert [name for name, _ in layers] == ["llm.model.layers.0.mlp", "llm.model.layers.1.mlp"]
    assert all(layer.num_experts == 3 and layer.meta_expert is not None for _, layer in layers)


def test_a_missing_expert_and_an_unknown_key_are_named(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    folder = write_moe_llava(tmp_path, tiny_clip, tiny_llama, kind="llama", layers=[0])
    state = load_file(str(folder / "model.safetensors"))
    del state[f"model.layers.0.{EXPERTS}.2.up_proj.weight"]
    state["model.layers.0.mlp.coefficient.weight"] = torch.zeros(2, 4)  # Residual-MoE's, not this layout's
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    message = str(info.value)
    assert message.startswith("model.init: ") and "not a moe_llava checkpoint" in message
    assert "model.layers.0.mlp.coefficient.weight" in message
    assert "llm.model.layers.0.mlp.experts.2.up_proj.weight" in message


def test_settings_and_unsupported_moe_fields_are_named(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    folder = write_moe_llava(tmp_path, tiny_clip, tiny_llama, kind="llama", layers=[0])
    unpadded = _cfg(tmp_path, folder, tiny_clip, "model.vision.pad_square=false")
    with pytest.raises(ConfigError, match=r"model.vision.pad_square: False, but .*image_aspect_ratio = 'pad'"):
        build_model(unpadded.model, cache_dir=cache_dir)
    plain = load_config(
        REPO / "experiments" / "demo.yaml",
        [f"output_dir={tmp_path}/out", f"model.vision.path={tiny_clip}", f"model.llm.path={folder}"],
        check_paths=False,
    )
    with pytest.raises(ConfigError, match=r"is a LLaVA checkpoint .*set model.init: \{format: moe_llava"):
        build_model(plain.model, cache_dir=cache_dir)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["moe"]["use_residual"] = True
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"moe.use_residual is true"):
        build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    config["moe"] |= {"use_residual": False, "num_experts": [4, 3]}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"moe.num_experts .* one count per MoE layer"):
        build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
