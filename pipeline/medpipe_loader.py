"""Load a model that ``medpipe export --format medpipe`` wrote, with torch and transformers only.

This file is standalone: ``medpipe export`` copies it into every folder it writes in the ``medpipe`` format, and it
imports nothing from medpipe (a test checks that). Use it from the exported folder::

    import sys; sys.path.insert(0, "EXPORTED")
    from medpipe_loader import load
    model, tokenizer = load("EXPORTED")                    # a torch.nn.Module in eval mode, and the tokenizer
    pixels = model.preprocess([pil_image])                  # (N, 3, H, W), as medpipe's transform (needs Pillow)
    ids = model.prompt_ids(tokenizer, "<image>\\nWhat is shown?")  # <image> -> num_image_tokens placeholder ids
    logits = model(ids, pixel_values=pixels)                # (B, T, V): medpipe's logits
    answer = model.generate(ids, pixel_values=pixels, max_new_tokens=32)   # transformers' generate

The format (docs/export.md): ``medpipe_config.json`` (``format: medpipe``, ``format_version``), ``model.safetensors``
(or shards with ``model.safetensors.index.json``) under medpipe's state-dict names (``vision.encoder.*``,
``vision.output_norm.*``, ``connector.{fc1,fc2,proj}.*``, ``llm.*``; in a MoE layer
``llm.model.layers.<i>.mlp.{router.linear.*, experts.{w_in,w_out,b_in,b_out}, meta_expert.*}``), the tokenizer
files, and this file. The forward is medpipe's ``MultimodalLM`` at evaluation: the vision tower's hidden states of
``select_layer`` with the prefix tokens (CLS, registers) dropped, the optional output LayerNorm, the aggregation
(``none`` / ``avgpool`` / ``maxpool`` / ``concat4``), the connector (``mlp``: Linear-GELU-Linear; ``linear``), the
visual tokens written over the image placeholder ids, then the LLM, whose MoE layers route every token (padding
included, as in medpipe's generation): softmax of the router's float32 logits, top-k, optionally renormalised,
an evaluation capacity where the model has one (``position``: first choices first, then token order; ``random``:
a random subset), plus the meta expert.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "medpipe"
FORMAT_VERSION = 1
CONFIG_FILE = "medpipe_config.json"


# -- MoE feed-forward ----------------------------------------------------------------------------


class _Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, bias: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_experts, bias=bias)


class _Experts(nn.Module):
    """E stacked FFNs in matmul layout: ``w_in`` (E, D, 2F|F) (gated: ``[gate | up]``), ``w_out`` (E, F, O)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        e, d, f, o = spec["num_experts"], spec["hidden_size"], spec["ffn_size"], spec["out_size"]
        width = 2 * f if spec["gated"] else f
        self.gated = spec["gated"]
        self.activation = ACT2FN[spec["activation"]]
        self.w_in = nn.Parameter(torch.empty(e, d, width))
        self.w_out = nn.Parameter(torch.empty(e, f, o))
        self.b_in = nn.Parameter(torch.empty(e, width)) if spec["bias"] else None
        self.b_out = nn.Parameter(torch.empty(e, o)) if spec["bias"] else None

    def hidden(self, projected: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = projected.chunk(2, dim=-1)  # (n, F), (n, F)
            return self.activation(gate) * up
        return self.activation(projected)

    def run(self, x_sorted: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
        """Expert e on its contiguous block of rows of ``x_sorted`` (S, D) -> (S, O)."""
        out = x_sorted.new_empty(x_sorted.shape[0], self.w_out.shape[2])  # (S, O)
        start = 0
        for e, rows in enumerate(group_sizes):
            if rows == 0:
                continue
            end = start + rows
            if self.b_in is not None:
                projected = torch.addmm(self.b_in[e], x_sorted[start:end], self.w_in[e])  # (n_e, 2F|F)
                out[start:end] = torch.addmm(self.b_out[e], self.hidden(projected), self.w_out[e])  # (n_e, O)
            else:
                projected = torch.mm(x_sorted[start:end], self.w_in[e])  # (n_e, 2F|F)
                out[start:end] = torch.mm(self.hidden(projected), self.w_out[e])  # (n_e, O)
            start = end
        return out


class MoEFeedForward(nn.Module):
    """A decoder layer's MoE FFN as medpipe computes it at evaluation (module docstring)."""

    def __init__(self, spec: dict[str, Any], meta_expert: nn.Module | None) -> None:
        super().__init__()
        self.spec = spec
        self.router = _Router(spec["hidden_size"], spec["num_experts"], spec["router_bias"])
        self.experts = _Experts(spec)
        self.meta_expert = meta_expert

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # (N, D)
        linear = self.router.linear
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if linear.bias is None else linear.bias.float()
            probs = F.linear(x.float(), linear.weight.float(), bias).softmax(dim=-1)  # (N, E)
        weights, indices = probs.topk(spec["top_k"], dim=-1)  # (N, k), (N, k)
        if spec["renormalize"]:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # (N, k)
        token_index, kept_weights, group_sizes = self._dispatch(indices, weights)
        x_sorted = x.index_select(0, token_index)  # (S, D) grouped by expert
        y_sorted = self.experts.run(x_sorted, group_sizes) * kept_weights.to(x.dtype).unsqueeze(1)  # (S, O)
        out = y_sorted.new_zeros(x.shape[0], y_sorted.shape[1]).index_add(0, token_index, y_sorted)  # (N, O)
        if self.meta_expert is not None:
            out = out + self.meta_expert(x)  # (N, D)
        return out.view(hidden_states.shape)  # (B, T, D)

    def _dispatch(self, indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Assignments grouped by expert (choice-major, stable), cut to the evaluation capacity."""
        num_tokens, top_k = indices.shape
        num_experts = self.spec["num_experts"]
        capacity = self.spec["capacity"]
        experts = indices.t().reshape(-1)  # (k*N,) first choices first
        if capacity is not None and capacity["drop"] == "random":
            shuffle = torch.randperm(experts.numel(), device=experts.device)  # (k*N,)
            sorted_experts, order = torch.sort(experts[shuffle], stable=True)  # (k*N,), (k*N,)
            order = shuffle[order]  # (k*N,)
        else:
            sorted_experts, order = torch.sort(experts, stable=True)  # (k*N,), (k*N,)
        counts = torch.bincount(experts, minlength=num_experts)  # (E,)
        if capacity is not None:
            factor = capacity["eval_factor"] if capacity["eval_factor"] is not None else capacity["factor"]
            limit = max(capacity["min_capacity"], math.ceil(factor * num_tokens * top_k / num_experts))
            rank = (
                torch.arange(experts.numel(), device=experts.device)
                - (torch.cumsum(counts, 0) - counts)[sorted_experts]
            )  # (k*N,) position inside its expert's group
            order = order[rank < limit]  # (S,)
            counts = counts.clamp(max=limit)  # (E,)
        flat_weights = weights.t().reshape(-1)  # (k*N,) choice-major like ``experts``
        return order % num_tokens, flat_weights[order], counts.tolist()


# -- the multimodal model ------------------------------------------------------------------------


class _VisionTower(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

        config = dict(spec["config"])
        model_type = config.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **config)
        if model_type in ("clip", "clip_vision_model"):
            self.encoder = CLIPVisionModel(getattr(hf_config, "vision_config", hf_config))
        elif model_type in ("siglip", "siglip_vision_model"):
            self.encoder = SiglipVisionModel(getattr(hf_config, "vision_config", hf_config))
        else:
            self.encoder = AutoModel.from_config(hf_config)
        self.spec = spec
        self.output_norm = nn.LayerNorm(spec["hidden_size"], eps=1e-5) if spec["output_norm"] else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens, D_vision)."""
        spec = self.spec
        dtype = next(self.encoder.parameters()).dtype
        out = self.encoder(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[spec["select_layer"]]  # (N, prefix + P, D)
        patches = features[:, spec["num_prefix_tokens"] :]  # (N, P, D)
        if spec["select_feature"] == "cls_patch" and spec["has_cls"]:
            patches = torch.cat([features[:, :1], patches], dim=1)  # (N, 1 + P, D)
        if self.output_norm is None:
            return patches
        norm = self.output_norm
        normed = F.layer_norm(patches.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
        return normed.to(patches.dtype)  # (N, P, D)


def _aggregate(tokens: torch.Tensor, mode: str, pool: int) -> torch.Tensor:
    if mode == "none":
        return tokens
    n, p, d = tokens.shape
    if mode == "concat4":
        return tokens.reshape(n, p // 4, 4 * d)  # (N, P/4, 4D): 4 consecutive tokens side by side
    side = math.isqrt(p)
    grid = tokens.transpose(1, 2).reshape(n, d, side, side)  # (N, D, g, g)
    pooled = (F.avg_pool2d if mode == "avgpool" else F.max_pool2d)(grid, pool)  # (N, D, g/pool, g/pool)
    return pooled.flatten(2).transpose(1, 2)  # (N, P/pool^2, D)


class _Connector(nn.Module):
    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.fc1, self.act, self.fc2 = nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        elif kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            raise ValueError(f"connector {kind!r}: this loader has mlp and linear")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.fc2(self.act(self.fc1(features)))
        return self.proj(features)


class MedpipeVLM(nn.Module):
    """Vision tower, aggregation, connector and LLM with medpipe's state-dict names (module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = config
        self.image_token_id = int(config["image_token_id"])
        self.num_image_tokens = int(config["num_image_tokens"])
        self.vision = _VisionTower(config["vision"])
        connector = config["connector"]
        self.connector = _Connector(connector["type"], connector["in_dim"], connector["out_dim"])
        llm = dict(config["llm"]["config"])
        self.llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(llm.pop("model_type"), **llm))
        layers = self.llm.get_decoder().layers
        for spec in config["moe_layers"]:
            layer = layers[spec["layer"]]
            layer.mlp = MoEFeedForward(spec, layer.mlp if spec["meta_expert"] else None)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_image_tokens, D_llm)."""
        aggregation = self.config["aggregation"]
        features = _aggregate(self.vision(pixel_values), aggregation["mode"], aggregation["pool"])
        return self.connector(features)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the visual tokens at the image placeholder positions: (B, T, D)."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)
        positions = input_ids == self.image_token_id  # (B, T)
        images = 0 if pixel_values is None else pixel_values.shape[0]
        if int(positions.sum()) != images * self.num_image_tokens:
            raise ValueError(
                f"{int(positions.sum())} image placeholder ids for {images} images x {self.num_image_tokens} tokens"
            )
        if images:
            visual = self.encode_images(pixel_values).to(embeds.dtype)  # (N, I, D)
            rows = visual.reshape(-1, visual.shape[-1])  # (N*I, D), image by image: row-major placeholder order
            embeds = embeds.masked_scatter(positions.unsqueeze(-1), rows)  # (B, T, D)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' ``generate`` on the embedded prompt; returns the new token ids (B, new)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values)
        kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def prompt_ids(self, tokenizer: Any, text: str, image_token: str = "<image>") -> torch.Tensor:
        """``text`` tokenised with each ``image_token`` expanded to the placeholder ids: (1, T). Apply the chat
        template to ``text`` first (``tokenizer.apply_chat_template(..., tokenize=False)``) for chat models."""
        pieces = text.split(image_token)
        ids: list[int] = tokenizer(pieces[0]).input_ids
        for piece in pieces[1:]:
            ids += [self.image_token_id] * self.num_image_tokens
            ids += tokenizer(piece, add_special_tokens=False).input_ids
        return torch.tensor([ids])

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """PIL images -> (N, 3, H, W) pixels exactly as medpipe's transform computes them (needs Pillow)."""
        return torch.stack([_transform(image, self.config["image_transform"]) for image in images])


_RESAMPLE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5}  # PIL's filter numbers = transformers' PILImageResampling


def _transform(img: Any, spec: dict[str, Any]) -> torch.Tensor:
    """medpipe's ``ImageTransform``: pad to square (LLaVA's expand2square), resize, centre crop, rescale, normalise."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    if spec["pad_square"] and img.width != img.height:
        side = max(img.size)
        canvas = Image.new(img.mode, (side, side), tuple(int(m * 255) for m in spec["image_mean"]))
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    size = spec["size"]
    if spec["do_resize"]:
        if "shortest_edge" in size:
            edge, (w, h) = int(size["shortest_edge"]), img.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(edge * long / short)
            img = img.resize((edge, new_long) if w <= h else (new_long, edge), _RESAMPLE.get(spec["resample"], 3))
        else:
            img = img.resize((int(size["width"]), int(size["height"])), _RESAMPLE.get(spec["resample"], 3))
    crop = spec["crop_size"]
    if spec["do_center_crop"] and crop:
        ch, cw = int(crop["height"]), int(crop["width"])
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    arr = np.asarray(img)  # (H, W, 3) uint8
    arr = (
        (arr.astype(np.float64) * spec["rescale_factor"]).astype(np.float32)
        if spec["do_rescale"]
        else arr.astype(np.float32)
    )
    if spec["do_normalize"]:
        arr = (arr - np.asarray(spec["image_mean"], np.float32)) / np.asarray(spec["image_std"], np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (3, H, W)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no model*.safetensors")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_config(folder: str | Path) -> dict[str, Any]:
    """``medpipe_config.json``, checked to be this loader's format and version."""
    path = Path(folder) / CONFIG_FILE
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT or int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {config.get('format')!r} version {config.get('format_version')!r}; this loader reads "
            f"{FORMAT!r} up to version {FORMAT_VERSION}"
        )
    return config


def load(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[MedpipeVLM, Any]:
    """The model (eval mode, every tensor as exported, strict key check) and its tokenizer."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = load_config(folder)
    model = MedpipeVLM(config)
    state = _read_weights(folder)
    for name in ("vision", "connector", "llm"):  # each part in the dtype it was exported in
        dtypes = [t.dtype for k, t in state.items() if k.startswith(name + ".") and t.is_floating_point()]
        if dtypes:
            getattr(model, name).to(dtypes[0])
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer


__all__ = ["FORMAT", "FORMAT_VERSION", "MedpipeVLM", "MoEFeedForward", "load", "load_config"]
