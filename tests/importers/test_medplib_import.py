"""MedPLIB's released stage-IV folder imported into medpipe's grounded MoE model: every key accounted for (the
SAM-Med2D adapters left out only when the config allows it), and the outputs of a re-implementation of MedPLIB's
forward on the same tensors.

The source is a tiny folder written here as ``merge_lora_weights_and_save_hf_model_moe.py`` writes it (random
weights, the real key names and config fields): Llama keys with DeepSpeed MoE layers (2 experts, router ``wg``
without bias), ``model.vision_tower.vision_tower.*``, ``model.mm_projector.{0,2}``, ``model.region_fea_adapter``,
``model.text_hidden_fcs.0.{0,2}``, ``model.visual_model.*`` (SAM in segment-anything's layout, with SAM-Med2D's
``image_encoder.blocks.{i}.Adapter.*``), and the tokenizer with MedPLIB's added tokens.

The reference follows the released code: image tokens = ``mm_projector(CLIP patches)``; the region token as
``extract_region_feature`` computes it (``medplib_arch.py``: the adapter over the whole CLIP patch map first, then
``grid_sample`` at ``nonzero() / (H, W)``, ``align_corners=True``, mean over the points); the Llama decoder with
each MoE layer a token-by-token loop of DeepSpeed's top-1 gate (softmax, argmax, weight = its probability, nothing
dropped at evaluation: capacity factor 2 with 2 experts); the mask from the hidden state before ``<SEG>`` through
``text_hidden_fcs`` and SAM's mask decoder, as ``MedPLIB.py`` prompts it (the text embedding as the one sparse
token, the no-mask dense embedding, ``multimask_output=False``). SAM itself runs as transformers' ``SamModel``
loaded by medpipe's SAM converter (``sam_convert.py``, tested on its own), so the SAM part checks the key mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import ConfigError, load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
# train_ds_medplib.py / merge script: utils.ADD_OTHERS_TOKENS + <gen_i> + <im_start>, <im_end> (a few <gen_i> here)
MEDPLIB_TOKENS = ["<SEG>", "<ref>", "</ref>", "<region>", "</region>", "<sr>", "</sr>", "<mask>", "</mask>"]
MEDPLIB_TOKENS += [f"<gen_{i}>" for i in range(1, 5)] + ["<im_start>", "<im_end>"]
TOWER = "model.vision_tower.vision_tower.vision_model."
SAM = "model.visual_model."


def _adapter(channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """SAM-Med2D's Adapter_Layer (modeling/image_encoder.py:18-56) parameters."""
    hidden = int(channels * 0.25)
    return {
        "norm.weight": torch.ones(channels),
        "norm.bias": torch.zeros(channels),
        "channel.0.weight": torch.randn(hidden, channels, generator=generator),
        "channel.2.weight": torch.randn(channels, hidden, generator=generator),
        "spatial.0.weight": torch.randn(channels, channels, 3, 3, generator=generator),
        "spatial.2.weight": torch.randn(channels, channels, 4, 4, generator=generator),  # ConvTranspose2d (in, out)
    }


def write_medplib(root: Path, clip_dir: Path, llm_dir: Path, sam_dir: Path, *, layers: list[int]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, SamConfig, SamModel

    from lightningmodules.models.sam_convert import to_original_keys

    out = root / "medplib-7b-2e"
    out.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    tokenizer.add_tokens(MEDPLIB_TOKENS, special_tokens=True)
    torch.manual_seed(1)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    llm.resize_token_embeddings(len(tokenizer))
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(clip_dir))
    sam_config = SamConfig.from_pretrained(sam_dir)
    torch.manual_seed(3)
    sam = SamModel(sam_config)
    d_vision, d_llm, prompt_dim = (
        clip.config.hidden_size,
        llm.config.hidden_size,
        sam_config.prompt_encoder_config.hidden_size,
    )
    generator = torch.Generator().manual_seed(4)
    state = {}
    for key, value in llm.state_dict().items():
        parts = key.split(".")
        if key.startswith("model.layers.") and int(parts[2]) in layers and parts[3] == "mlp":
            continue
        state[key] = value.clone()
    for index in layers:  # expert 0 = the grounding expert's FFN, expert 1 = the language expert's (random here)
        prefix = f"model.layers.{index}.mlp.deepspeed_moe"
        for name, value in llm.model.layers[index].mlp.state_dict().items():
            for e in range(2):
                state[f"{prefix}.experts.deepspeed_experts.{e}.{name}"] = (
                    value + torch.randn(value.shape, generator=generator) * 0.2
                )
        state[f"{prefix}.gate.wg.weight"] = torch.randn(2, d_llm, generator=generator)  # DeepSpeed: bias=False
    state.update({f"{TOWER}{k}": v.clone() for k, v in clip.state_dict().items()})
    state["model.mm_projector.0.weight"] = torch.randn(d_llm, d_vision, generator=generator) * 0.1
    state["model.mm_projector.0.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(d_llm, d_llm, generator=generator) * 0.1
    state["model.mm_projector.2.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state["model.region_fea_adapter.weight"] = torch.randn(d_llm, d_vision, generator=generator) * 0.1
    state["model.region_fea_adapter.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state["model.text_hidden_fcs.0.0.weight"] = torch.randn(d_llm, d_llm, generator=generator) * 0.1
    state["model.text_hidden_fcs.0.0.bias"] = torch.randn(d_llm, generator=generator) * 0.1
    state["model.text_hidden_fcs.0.2.weight"] = torch.randn(prompt_dim, d_llm, generator=generator) * 0.1
    state["model.text_hidden_fcs.0.2.bias"] = torch.randn(prompt_dim, generator=generator) * 0.1
    sam_state = {k: v.clone() for k, v in sam.state_dict().items()}
    state.update({f"{SAM}{k}": v for k, v in to_original_keys(sam_state, sam_config).items()})
    channels = sam_config.vision_config.hidden_size
    for block in range(sam_config.vision_config.num_hidden_layers):
        for name, value in _adapter(channels, generator).items():
            state[f"{SAM}image_encoder.blocks.{block}.Adapter.{name}"] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    fields = {
        **{k: v for k, v in llm.config.to_dict().items() if k not in ("transformers_version", "dtype")},
        "model_type": "medplib_moe_llama",
        "architectures": ["MedPLIBForCausalLM"],
        "moe": {
            "moe_enable": True,
            "moe_mode": "dense",
            "moe_layers_idx": layers,
            "ep_size": 1,
            "top_k_experts": 1,
            "capacity_factor": 1.5,
            "eval_capacity_factor": 2.0,
            "min_capacity": 0,
            "use_residual": False,
            "router_aux_loss_coef": 0.0,
            "num_experts": [2] * len(layers),
        },
        "mm_vision_tower": str(clip_dir),
        "vision_tower": str(clip_dir),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": d_vision,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "square",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": True,
        "train_mask_decoder": True,
        "out_dim": prompt_dim,
        "max_sample_point": 512,
        "use_mm_proj": True,
        "vocab_size": len(tokenizer),
    }
    (out / "config.json").write_text(json.dumps(fields))
    tokenizer.save_pretrained(out)
    return out


def _cfg(tmp: Path, folder: Path, clip_dir: Path, *overrides: str):
    return load_config(
        REPO / "experiments" / "medplib" / "tiny.yaml",
        [
            f"output_dir={tmp}/out",
            f"model.vision.path={clip_dir}",
            "model.vision.pad_square=true",
            "model.connector.aggregation=none",
            f"model.llm.path={folder}",
            "model.grounding.sam_path=tiny:medsam",
            "model.grounding.sam_format=hf",
            "model.grounding.sam_allow_missing_adapters=true",
            f"model.init={{format: medplib, path: {folder}}}",
            *overrides,
        ],
        check_paths=False,
    )


class ReferenceTop1(nn.Module):
    """DeepSpeed's top-1 MoE at evaluation (nothing dropped), token by token."""

    def __init__(self, wg: torch.Tensor, experts: list[nn.Module]) -> None:
        super().__init__()
        self.wg, self.experts, self.chosen = wg, nn.ModuleList(experts), []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = []
        for x in hidden.reshape(-1, hidden.shape[-1]):
            probs = torch.softmax(F.linear(x.float(), self.wg), dim=-1)  # (E,)
            e = int(probs.argmax())
            self.chosen.append(e)
            rows.append(probs[e] * self.experts[e](x[None])[0])
        return torch.stack(rows).view(hidden.shape)


def _reference(folder: Path, ids: list[int], pixels: torch.Tensor, region_mask: torch.Tensor, seg_at: int):
    """(logits (T, V_src), hidden state before <SEG> (D,), routed experts) of MedPLIB's forward."""
    import copy

    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

    state = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in config.items() if k not in ("moe", "model_type", "architectures")}
    llm = AutoModelForCausalLM.from_config(LlamaConfig(**fields)).eval()
    dense = {
        k: v for k, v in state.items() if k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))
    }
    dense = {k: v for k, v in dense.items() if ".deepspeed_moe." not in k}
    llm.load_state_dict(dense, strict=False)
    for index in config["moe"]["moe_layers_idx"]:
        prefix = f"model.layers.{index}.mlp.deepspeed_moe"
        experts = []
        for e in range(2):
            expert = copy.deepcopy(llm.model.layers[index].mlp)
            name = f"{prefix}.experts.deepspeed_experts.{e}."
            expert.load_state_dict({k.removeprefix(name): v for k, v in state.items() if k.startswith(name)})
            experts.append(expert)
        llm.model.layers[index].mlp = ReferenceTop1(state[f"{prefix}.gate.wg.weight"], experts)
    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config["mm_vision_tower"])).eval()
    clip.load_state_dict({k.removeprefix(TOWER): v for k, v in state.items() if k.startswith(TOWER)})
    image_token = ids.index(-200)
    region_token = ids.index(-300)
    with torch.no_grad():
        features = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, P, Dv)
        projected = F.linear(
            F.gelu(F.linear(features, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
            state["model.mm_projector.2.weight"],
            state["model.mm_projector.2.bias"],
        )[0]  # (P, D)
        # extract_region_feature: the adapter over the whole map, then point samples at nonzero() / (H, W)
        adapted = F.linear(
            features[0], state["model.region_fea_adapter.weight"], state["model.region_fea_adapter.bias"]
        )
        grid = region_mask.shape[-1]
        feature_map = adapted.T.reshape(1, -1, grid, grid)  # (1, D, G, G)
        points = region_mask.nonzero().float() / torch.tensor([grid, grid])  # (N, 2): (row, col) / (H, W)
        xy = points.flip(-1)[None, :, None, :]  # (1, N, 1, 2): (x, y)
        sampled = F.grid_sample(feature_map, 2.0 * xy - 1.0, align_corners=True)[0, :, :, 0]  # (D, N)
        region = sampled.mean(dim=1)  # (D,)
        embed = llm.get_input_embeddings()
        pieces = []
        for position, token in enumerate(ids):
            if position == image_token:
                pieces.append(projected)
            elif position == region_token:
                pieces.append(region[None])
            else:
                pieces.append(embed(torch.tensor([token])))
        embeds = torch.cat(pieces)[None]  # (1, T, D)
        out = llm(inputs_embeds=embeds, output_hidden_states=True)
    # the hidden state at the position whose prediction is <SEG>, after the final norm (hidden_states[-1])
    seg_index = seg_at - 1 + (projected.shape[0] - 1)  # positions after the single -200 shift by P - 1
    hidden = out.hidden_states[-1][0, seg_index]
    chosen = [e for layer in llm.model.layers if isinstance(layer.mlp, ReferenceTop1) for e in layer.mlp.chosen]
    return out.logits[0], hidden, chosen, state


def test_medplib_equals_its_own_forward(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from transformers import AutoTokenizer, SamConfig, SamModel

    from lightningmodules.models.sam_convert import convert_sam_checkpoint
    from pipeline.structure import model_structure
    from pipeline.zoo import ensure_tiny

    sam_dir = ensure_tiny("medsam", cache_dir)
    folder = write_medplib(tmp_path, tiny_clip, tiny_llama, sam_dir, layers=[0, 1])
    built = build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    model = built.model.eval()
    (entry,) = model_structure(model)
    assert entry["layers"] == [0, 1] and entry["num_experts"] == 2 and entry["top_k"] == 1
    assert not entry["meta_expert"] and not entry["router_bias"]
    assert (entry["capacity_factor"], entry["eval_capacity_factor"], entry["drop_policy"]) == (1.5, 2.0, "random")
    # MedPLIB's own tokens keep their ids (their trained embedding rows); medpipe's extra ones come after
    released = AutoTokenizer.from_pretrained(folder)
    for token in ("<SEG>", "<region>", "</region>"):
        assert built.tokenizer.convert_tokens_to_ids(token) == released.convert_tokens_to_ids(token)
    seg, start, end = (released.convert_tokens_to_ids(t) for t in ("<SEG>", "<region>", "</region>"))
    grid = model.region.grid_size
    region_mask = torch.zeros(grid, grid, dtype=torch.bool)
    region_mask[1:4, 2:6] = True
    region_mask[6, 7] = True
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    # the released sequence: -200 = the image, -300 = the region feature between <region> and </region>
    released_ids = [1, 5, -200, 7, start, -300, end, 9, 10, seg, 11]
    reference, ref_hidden, chosen, state = _reference(
        folder, released_ids, pixels, region_mask, released_ids.index(seg)
    )
    assert len(set(chosen)) == 2  # both experts are used
    image_id, region_id = model.image_token_id, model.region_token_id
    ours_ids = []
    for token in released_ids:
        ours_ids += [image_id] * model.num_image_tokens if token == -200 else [region_id] if token == -300 else [token]
    ids = torch.tensor([ours_ids])
    with torch.no_grad():
        out = model(
            ids,
            torch.ones_like(ids),
            pixel_values=pixels,
            region_masks_input=region_mask[None],
            region_batch_index=torch.tensor([0]),
        )
        logits = model.output_logits(out.hidden_states)[0]  # (T, V)
    torch.testing.assert_close(logits[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)
    hidden = out.hidden_states[0, ours_ids.index(seg) - 1]
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-4, rtol=1e-4)

    # SAM: the imported head is the checkpoint's visual_model (adapters left out), converted
    sam_config = SamConfig.from_pretrained(sam_dir)
    original = {k.removeprefix(SAM): v for k, v in state.items() if k.startswith(SAM) and ".Adapter." not in k}
    converted, unmapped = convert_sam_checkpoint(original, sam_config)
    assert not unmapped
    imported = model.grounding.sam.state_dict()
    assert set(imported) == set(converted)
    for key, value in converted.items():
        torch.testing.assert_close(imported[key], value, atol=0, rtol=0, msg=key)
    reference_sam = SamModel(sam_config).eval()
    reference_sam.load_state_dict(converted)
    sam_pixels = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        text = F.linear(
            F.relu(
                F.linear(ref_hidden, state["model.text_hidden_fcs.0.0.weight"], state["model.text_hidden_fcs.0.0.bias"])
            ),
            state["model.text_hidden_fcs.0.2.weight"],
            state["model.text_hidden_fcs.0.2.bias"],
        )  # (C,)
        image_embeddings = reference_sam.get_image_embeddings(sam_pixels)  # (1, C, g, g)
        channels, size = image_embeddings.shape[1], image_embeddings.shape[-1]
        dense = reference_sam.prompt_encoder.no_mask_embed.weight.reshape(1, channels, 1, 1).expand(
            1, channels, size, size
        )
        masks, _ = reference_sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=reference_sam.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=text[None, None, None, :],  # prompt_encoder(text_embeds=...): one sparse token
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        head = model.grounding
        ours_mask = head.decode(
            image_embeddings=head.image_embeddings(sam_pixels), prompt_embeddings=head.seg_projection(hidden[None])
        )  # (1, 4g, 4g)
    torch.testing.assert_close(ours_mask, masks[:, 0, 0], atol=1e-4, rtol=1e-4)


def test_adapters_need_the_config_to_allow_leaving_them_out(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from pipeline.zoo import ensure_tiny

    folder = write_medplib(tmp_path, tiny_clip, tiny_llama, ensure_tiny("medsam", cache_dir), layers=[1])
    strict = _cfg(tmp_path, folder, tiny_clip, "model.grounding.sam_allow_missing_adapters=false")
    with pytest.raises(ConfigError, match=r"model.grounding.sam_allow_missing_adapters: false, but .* adapter"):
        build_model(strict.model, cache_dir=cache_dir)
    unpadded = _cfg(tmp_path, folder, tiny_clip, "model.vision.pad_square=false")
    with pytest.raises(ConfigError, match=r"model.vision.pad_square: False, but .*set model.vision.pad_square: True"):
        build_model(unpadded.model, cache_dir=cache_dir)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.text_hidden_fcs.0.2.bias"]
    state["model.visual_model.mask_decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        build_model(_cfg(tmp_path, folder, tiny_clip).model, cache_dir=cache_dir)
    message = str(info.value)
    assert "not a medplib checkpoint" in message and "grounding.seg_projection.2.bias" in message
    assert "grounding.sam@original.mask_decoder.extra.weight" in message


def test_region_off_leaves_the_adapter_out(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from pipeline.zoo import ensure_tiny

    folder = write_medplib(tmp_path, tiny_clip, tiny_llama, ensure_tiny("medsam", cache_dir), layers=[0])
    built = build_model(_cfg(tmp_path, folder, tiny_clip, "model.grounding.region=false").model, cache_dir=cache_dir)
    assert built.model.region is None
    weight = load_file(str(folder / "model.safetensors"))["model.text_hidden_fcs.0.0.weight"]
    torch.testing.assert_close(built.model.grounding.seg_projection[0].weight, weight)
