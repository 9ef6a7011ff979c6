"""Uni-Med's checkpoint imported into medpipe's CMoE connector with its LoRA merged into the LLM: every key
accounted for, the settings checked against the saved training config, and the logits of a re-implementation of
Uni-Med's forward on the same tensors.

The source is a tiny ``.pth`` written here as ``runner_base._save_checkpoint`` writes it (random weights, the
real key names and config fields): ``{"model": trainable parameters + buffers, "optimizer", "config", "scaler",
"epoch"}`` with ``task_tokens.*``, ``moe_layers.{e}.{0,2}`` and their second name ``llm_proj.*``, ``router.fc1/fc2``,
peft's ``llm_model.base_model.model.<module>.lora_{A,B}.default.weight`` on every Linear but ``lm_head`` and
transformers 4.30's ``rotary_emb.inv_freq`` buffers. The LLM base is the tiny Llama folder (``model.llm.path``).

The reference follows ``uni_med/models/uni_med.py`` ``encode_img``: ``ln_vision`` (a fresh LayerNorm), CLS
dropped, four consecutive tokens concatenated, the router ``Mlp`` on ``[task token | visual token]``, soft weights
``sigmoid`` normalised to sum 1, the experts' weighted sum; and the LLM with its LoRA *unmerged* (each adapted
Linear adds ``lora_alpha / r * B(A(x))``, as peft computes it), so the merge is checked too.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules.specs import TASK_IDS
from pipeline.config import ConfigError, load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
TASKS = ("vqa", "refer", "identify", "caption", "cls")
LORA_RANK, LORA_ALPHA = 4, 16
PEFT = "llm_model.base_model.model."


def _training_config(task_dim: int, **changes) -> dict:
    """train_configs/uni_med.yaml's model section (the fields the checkpoint's config carries)."""
    model = {
        "arch": "uni_med",
        "model_type": "pretrain",
        "image_size": 224,
        "drop_path_rate": 0,
        "use_grad_checkpoint": True,
        "vit_precision": "fp16",
        "freeze_vit": True,
        "resample_rate": 4,
        "resample_method": "projection",
        "has_moe": True,
        "projector_type": "moe_mlp",
        "num_experts": 5,
        "router_method": "router_task_token",
        "num_task_tokens": 1,
        "task_token_c": task_dim,
        "router_type": "soft",
        "llm_model_name": "llama2",
        "llm_model_path": "",
        "sft_type": "lora",
        "lora_target_modules": ["all"],
        "lora_r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "chat_template": True,
        "max_txt_len": 1024,
        "end_sym": "</s>",
        **changes,
    }
    return {"model": model, "run": {"task": "image_text_pretrain", "init_lr": 1e-5, "max_epoch": 1}}


def write_uni_med(root: Path, clip_dir: Path, llm_dir: Path, **changes) -> Path:
    from transformers import AutoModelForCausalLM, CLIPVisionConfig

    d_vision = CLIPVisionConfig.from_pretrained(clip_dir).hidden_size
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    d_llm, in_dim = llm.config.hidden_size, 4 * d_vision
    generator = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    for task in TASKS:
        state[f"task_tokens.{task}"] = torch.randn(1, 1, in_dim, generator=generator)
    for e in range(5):
        fc1_w = torch.randn(d_llm, in_dim, generator=generator) / math.sqrt(in_dim)
        fc1_b = torch.randn(d_llm, generator=generator) * 0.1
        fc2_w = torch.randn(d_llm, d_llm, generator=generator) / math.sqrt(d_llm)
        fc2_b = torch.randn(d_llm, generator=generator) * 0.1
        for name in ("moe_layers", "llm_proj"):  # one module, two names (models/uni_med.py:133,155)
            state |= {f"{name}.{e}.0.weight": fc1_w, f"{name}.{e}.0.bias": fc1_b}
            state |= {f"{name}.{e}.2.weight": fc2_w, f"{name}.{e}.2.bias": fc2_b}
    router_in = 2 * in_dim
    state["router.fc1.weight"] = torch.randn(4 * router_in, router_in, generator=generator) / math.sqrt(router_in)
    state["router.fc1.bias"] = torch.randn(4 * router_in, generator=generator) * 0.1
    state["router.fc2.weight"] = torch.randn(5, 4 * router_in, generator=generator) / math.sqrt(router_in)
    state["router.fc2.bias"] = torch.randn(5, generator=generator)
    for name, module in llm.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:  # find_all_linear_names
            state[f"{PEFT}{name}.lora_A.default.weight"] = (
                torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.1
            )
            state[f"{PEFT}{name}.lora_B.default.weight"] = (
                torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.1
            )
    head_dim = d_llm // llm.config.num_attention_heads
    for index in range(llm.config.num_hidden_layers):  # transformers 4.30: a persistent buffer
        state[f"{PEFT}model.layers.{index}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        )
    path = root / "checkpoint_best.pth"
    saved = {
        "model": state,
        "optimizer": {
            "state": {},
            "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}],
        },
        "config": _training_config(in_dim, **changes),
        "scaler": None,
        "epoch": 0,
    }
    torch.save(saved, path)
    return path


def _cfg(tmp: Path, checkpoint: Path, clip_dir: Path, llm_dir: Path, task_dim: int, *overrides: str):
    return load_config(
        REPO / "experiments" / "uni_med" / "tiny.yaml",
        [
            f"output_dir={tmp}/out",
            f"model.vision.path={clip_dir}",
            "model.vision.output_norm=true",
            f"model.llm.path={llm_dir}",
            f"model.connector.task_embed_dim={task_dim}",
            f"model.init={{format: uni_med, path: {checkpoint}}}",
            *overrides,
        ],
        check_paths=False,
    )


def _reference_logits(checkpoint: Path, clip_dir: Path, llm_dir: Path, pixels, prefix, suffix, task: str):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    saved = torch.load(checkpoint, weights_only=True)
    state, scale = saved["model"], saved["config"]["model"]["lora_alpha"] / saved["config"]["model"]["lora_r"]
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    for name, module in llm.named_modules():  # peft's unmerged LoRA forward: base(x) + scale * B(A(x))
        key = f"{PEFT}{name}.lora_A.default.weight"
        if key in state:
            a, b = state[key], state[f"{PEFT}{name}.lora_B.default.weight"]
            module.register_forward_hook(
                lambda _m, args, out, a=a, b=b: out + scale * F.linear(F.linear(args[0], a), b)
            )
    clip = CLIPVisionModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (1, 1+P, Dv)
        embeds = F.layer_norm(hidden, hidden.shape[-1:], eps=1e-5)[:, 1:]  # ln_vision (weight 1, bias 0), CLS dropped
        bs, pn, hs = embeds.shape
        embeds = embeds.reshape(bs, pn // 4, hs * 4)  # (1, P/4, 4 Dv): four consecutive tokens
        token = state[f"task_tokens.{task}"].repeat(bs, pn // 4, 1)  # (1, P/4, C)
        mix = torch.cat([token, embeds], dim=2)
        logits = F.linear(F.gelu(F.linear(mix, state["router.fc1.weight"], state["router.fc1.bias"])),
                          state["router.fc2.weight"], state["router.fc2.bias"])  # fmt: skip
        weights = logits.sigmoid()
        weights = weights / weights.sum(dim=-1, keepdim=True)  # (1, P/4, E)
        if saved["config"]["model"]["router_type"] == "hard":  # models/uni_med.py:202-205: the task's own expert
            weights = F.one_hot(torch.tensor(TASKS.index(task)), 5).float().expand_as(weights)
        projected = sum(
            weights[:, :, e, None]
            * F.linear(
                F.gelu(F.linear(embeds, state[f"moe_layers.{e}.0.weight"], state[f"moe_layers.{e}.0.bias"])),
                state[f"moe_layers.{e}.2.weight"],
                state[f"moe_layers.{e}.2.bias"],
            )  # fmt: skip
            for e in range(5)
        )  # (1, P/4, D)
        embed = llm.get_input_embeddings()
        inputs = torch.cat([embed(torch.tensor([prefix])), projected, embed(torch.tensor([suffix]))], dim=1)
        return llm(inputs_embeds=inputs).logits[0], weights


@pytest.mark.parametrize(("task", "router_type"), [("refer", "soft"), ("cls", "soft"), ("identify", "hard")])
def test_uni_med_equals_its_own_forward(tmp_path, tiny_clip, tiny_llama, cache_dir, task, router_type) -> None:
    from transformers import CLIPVisionConfig

    task_dim = 4 * CLIPVisionConfig.from_pretrained(tiny_clip).hidden_size
    checkpoint = write_uni_med(tmp_path, tiny_clip, tiny_llama, router_type=router_type)
    cfg = _cfg(tmp_path, checkpoint, tiny_clip, tiny_llama, task_dim, f"model.connector.weighting={router_type}")
    built = build_model(cfg.model, cache_dir=cache_dir)
    model = built.model.eval()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 2 - 1
    prefix, suffix = [1, 5, 9], [11, 12]
    reference, weights = _reference_logits(checkpoint, tiny_clip, tiny_llama, pixels, prefix, suffix, task)
    assert float(weights.std()) > 1e-3  # the weights differ between experts (soft: and between tokens)
    ids = torch.tensor([prefix + [model.image_token_id] * model.num_image_tokens + suffix])
    with torch.no_grad():
        hidden = model(
            ids, torch.ones_like(ids), pixel_values=pixels, image_task_ids=torch.tensor([TASK_IDS[task]])
        ).hidden_states
        ours = model.output_logits(hidden)[0]
    torch.testing.assert_close(ours[:, : reference.shape[1]], reference, atol=1e-4, rtol=1e-4)


def test_settings_disagreeing_with_the_saved_config_name_the_key(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from transformers import CLIPVisionConfig

    task_dim = 4 * CLIPVisionConfig.from_pretrained(tiny_clip).hidden_size
    checkpoint = write_uni_med(tmp_path, tiny_clip, tiny_llama)
    sparse = _cfg(tmp_path, checkpoint, tiny_clip, tiny_llama, task_dim, "model.connector.weighting=sparse")
    with pytest.raises(ConfigError, match=r"model.connector.weighting: 'sparse', but .* router_type = 'soft'"):
        build_model(sparse.model, cache_dir=cache_dir)
    no_norm = _cfg(tmp_path, checkpoint, tiny_clip, tiny_llama, task_dim, "model.vision.output_norm=false")
    with pytest.raises(ConfigError, match=r"model.vision.output_norm: False"):
        build_model(no_norm.model, cache_dir=cache_dir)
    default_width = _cfg(tmp_path, checkpoint, tiny_clip, tiny_llama, task_dim, "model.connector.task_embed_dim=null")
    with pytest.raises(
        ConfigError, match=rf"model.connector.task_embed_dim: None, .*set model.connector.task_embed_dim: {task_dim}"
    ):
        build_model(default_width.model, cache_dir=cache_dir)


def test_a_lora_half_missing_and_an_unknown_key_are_named(tmp_path, tiny_clip, tiny_llama, cache_dir) -> None:
    from transformers import CLIPVisionConfig

    task_dim = 4 * CLIPVisionConfig.from_pretrained(tiny_clip).hidden_size
    checkpoint = write_uni_med(tmp_path, tiny_clip, tiny_llama)
    saved = torch.load(checkpoint, weights_only=True)
    del saved["model"][f"{PEFT}model.layers.1.mlp.up_proj.lora_B.default.weight"]
    saved["model"]["moe_layers.0.1.weight"] = torch.zeros(1)  # a layer moe_mlp does not have
    torch.save(saved, checkpoint)
    with pytest.raises(ConfigError) as info:
        build_model(_cfg(tmp_path, checkpoint, tiny_clip, tiny_llama, task_dim).model, cache_dir=cache_dir)
    message = str(info.value)
    assert "not a uni_med checkpoint" in message and "moe_layers.0.1.weight" in message
    assert "llm.model.layers.1.mlp.up_proj.weight@lora_B" in message
