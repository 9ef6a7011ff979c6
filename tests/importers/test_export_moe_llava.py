"""``medpipe export --format moe_llava``: a medpipe MoE model written in MoE-LLaVA / Med-MoE's released layout.

Two checks of the folder: (1) a round trip: ``model.init: {format: moe_llava}`` imports it back into the same
structure and the same logits (to 1e-6); (2) the independent re-implementation of the released forward in
``test_moe_llava_import.py`` (transformers' dense LLM with DeepSpeed's gate as a token-by-token loop, CLIP,
``mlp2x_gelu``) computes medpipe's logits from the exported tensors, so the folder is checked against the source
model's forward, not only against medpipe's own importer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from import_helpers import image, ours_logits
from safetensors.torch import load_file
from test_moe_llava_import import _reference_logits

from pipeline.config import load_config
from pipeline.model_factory import build_model

REPO = Path(__file__).resolve().parents[2]
EXPERTS = "mlp.deepspeed_moe.experts.deepspeed_experts"


def _built(tmp: Path, clip_dir: Path, cache_dir: Path, *overrides: str):
    """The demo's tiny CLIP + tiny Llama with the mlp connector on every patch (what MoE-LLaVA expresses)."""
    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [f"output_dir={tmp}/out", f"model.vision.path={clip_dir}", "model.connector.aggregation=none", *overrides],
        check_paths=False,
    )
    return cfg, build_model(cfg.model, cache_dir=cache_dir)


def _moe_model(tmp: Path, clip_dir: Path, cache_dir: Path, *overrides: str, **moe):
    """A tiny medpipe MoE model whose routers, experts, meta experts and connector are not the fresh ones (each
    expert its own weights, so routing matters)."""
    from pipeline.structure import add_moe

    cfg, built = _built(tmp, clip_dir, cache_dir, *overrides)
    add_moe(built.model, **moe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in built.model.named_parameters():
            if ".mlp." in name and name.startswith("llm.") or name.startswith("connector."):
                scale = 1.0 if ".router." in name else 0.2
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return cfg, built


def _imported(tmp: Path, folder: Path, clip_dir: Path, cache_dir: Path, *overrides: str):
    cfg = load_config(
        REPO / "experiments" / "demo.yaml",
        [
            f"output_dir={tmp}/again",
            f"model.vision.path={clip_dir}",
            "model.connector.aggregation=none",
            f"model.llm.path={folder}",
            f"model.init={{format: moe_llava, path: {folder}}}",
            *overrides,
        ],
        check_paths=False,
    )
    return build_model(cfg.model, cache_dir=cache_dir)


def _llm_config_dir(tmp: Path, built) -> Path:
    """The LLM's own config (medpipe's vocabulary size) for the reference forward."""
    folder = tmp / "llm-config"
    built.model.llm.config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("moe", "overrides"),
    [
        ({"layers": [0, 1], "num_experts": 3, "top_k": 1, "meta_expert": True}, ()),
        (
            {"layers": [1], "num_experts": 4, "top_k": 2, "meta_expert": False, "renormalize": True,
             "router_bias": False, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "drop_policy": "position",
             "capacity_counts_padding": True, "aux_loss_coef": 0.01},
            ("model.vision.pad_square=true",),
        ),
        (
            {"layers": [0], "num_experts": 2, "top_k": 1, "meta_expert": True, "router_bias": False},
            ("model.llm.path=tiny:phi",),
        ),
    ],
    ids=["med-moe-top1-meta", "moe-llava-top2-capacity-padded", "med-moe-phi-zero-router-bias"],
)  # fmt: skip
def test_round_trip_and_the_released_forward(tmp_path, tiny_clip, cache_dir, moe, overrides) -> None:
    from pipeline.export_moe import export_moe_llava
    from pipeline.structure import model_structure

    cfg, built = _moe_model(tmp_path, tiny_clip, cache_dir, *overrides, **moe)
    kind = built.model.llm.config.model_type  # llama, phi
    written = export_moe_llava(built, cfg.model, tmp_path / f"llava-moe-{kind}", vision_path=tiny_clip)
    config = json.loads((written.out / "config.json").read_text())
    assert config["model_type"] == f"moe_llava_{kind}"
    assert config["architectures"] == [f"MoELLaVA{kind.capitalize()}ForCausalLM"]
    assert config["moe"]["moe_layers_idx"] == moe["layers"]
    assert config["moe"]["num_experts"] == [moe["num_experts"]] * len(moe["layers"])
    assert config["moe"]["top_k_experts"] == moe["top_k"] and not config["moe"]["use_residual"]
    assert config["image_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert config["image_aspect_ratio"] == ("pad" if "model.vision.pad_square=true" in overrides else "square")
    assert "rope_parameters" not in config and config["rope_theta"] == 10000.0  # transformers 4.37's names
    tensors = load_file(str(written.out / "model.safetensors"))
    keys, layer = tensors.keys(), moe["layers"][0]
    down, up = ("fc2", "fc1") if kind == "phi" else ("down_proj", "up_proj")
    assert f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.weight" in keys
    assert f"model.layers.{layer}.{EXPERTS}.{moe['num_experts'] - 1}.{down}.weight" in keys
    assert (f"model.layers.{layer}.mlp.meta_moe.{up}.weight" in keys) == moe["meta_expert"]
    assert (f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.bias" in keys) == moe["meta_expert"]
    if moe["meta_expert"] and not moe.get("router_bias", True):  # Med-MoE's gate has a bias: zeros, same scores
        assert not tensors[f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.bias"].any()
        assert any("zero bias" in note for note in written.notes)
    assert not any(k.startswith(f"model.layers.{layer}.mlp.") and ".deepspeed_moe." not in k
                   and ".meta_moe." not in k for k in keys)  # fmt: skip

    # (1) the round trip: the same structure, the same logits
    again = _imported(tmp_path, written.out, tiny_clip, cache_dir, *overrides)
    (ours_entry,), (their_entry,) = model_structure(built.model), model_structure(again.model)
    # the same structure, but for a router without bias: Med-MoE's gate has one (written as zeros)
    assert their_entry == ours_entry | {"router_bias": ours_entry["router_bias"] or ours_entry["meta_expert"]}
    pixels, prefix, suffix = image(3), [1, 5, 9], [11, 12, 13]
    ours = ours_logits(built, prefix, suffix, pixels)  # (T, V)
    torch.testing.assert_close(ours_logits(again, prefix, suffix, pixels), ours, atol=1e-6, rtol=0)
    theirs = again.model.state_dict()
    for name, tensor in built.model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name

    # (2) the released forward on the exported tensors
    reference, chosen = _reference_logits(
        written.out, _llm_config_dir(tmp_path, built), tiny_clip, pixels, prefix, suffix, with_vision=True
    )
    assert len(set(chosen)) > 1  # routing is exercised
    assert reference.shape == ours.shape
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_a_dense_model_is_the_stage2_layout(tmp_path, tiny_clip, cache_dir) -> None:
    from pipeline.export_moe import export_moe_llava

    cfg, built = _built(tmp_path, tiny_clip, cache_dir)
    written = export_moe_llava(built, cfg.model, tmp_path / "llava-llama", vision_path=tiny_clip)
    config = json.loads((written.out / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and "moe" not in config and written.moe is None
    again = _imported(tmp_path, written.out, tiny_clip, cache_dir)
    pixels = image(4)
    torch.testing.assert_close(
        ours_logits(again, [1, 2], [3, 5], pixels), ours_logits(built, [1, 2], [3, 5], pixels), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("overrides", "moe", "named"),
    [
        (("model.connector.aggregation=avgpool",), None, "model.connector.aggregation is 'avgpool'"),
        ((), {"meta_expert": True, "capacity_factor": 1.5}, "moe.capacity_factor is 1.5 with the meta expert"),
        ((), {"meta_expert": False, "router_bias": False}, "moe.capacity_factor is null (dropless) without the meta"),
        ((), {"meta_expert": False, "router_bias": True, "capacity_factor": 1.0, "drop_policy": "random",
              "capacity_counts_padding": True}, "moe.router_bias is true without the meta expert"),
        ((), {"meta_expert": False, "router_bias": False, "capacity_factor": 1.0, "drop_policy": "position",
              "capacity_counts_padding": True}, "moe.drop_policy is 'position' (DeepSpeed's top-1 gate"),
        ((), {"meta_expert": True, "renormalize": True}, "moe.renormalize is true with top_k 1"),
    ],
    ids=["pooling", "meta-with-capacity", "dropless-without-meta", "bias-without-meta", "drop-policy", "renormalize"],
)  # fmt: skip
def test_what_moe_llava_cannot_express_is_refused(tmp_path, tiny_clip, cache_dir, overrides, moe, named) -> None:
    from pipeline.export import ExportError
    from pipeline.export_moe import export_moe_llava
    from pipeline.structure import add_moe

    cfg, built = _built(tmp_path, tiny_clip, cache_dir, *overrides)
    if moe is not None:
        add_moe(built.model, layers=[0], num_experts=2, **moe)
    with pytest.raises(ExportError) as info:
        export_moe_llava(built, cfg.model, tmp_path / "out")
    message = str(info.value)
    assert message.startswith("cannot export in MoE-LLaVA's layout: ") and named in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_export_command_moe_llava_and_help(tmp_path, tiny_clip, cache_dir, capsys) -> None:
    """``medpipe export RUN --format moe_llava``: the run's last hand-over (its MoE structure replayed) in the
    released layout; ``--help`` lists every format."""
    from omegaconf import OmegaConf

    from pipeline.cli import main
    from pipeline.export import EXPORT_FORMATS
    from pipeline.handover import save_handover
    from pipeline.run_state import RunState, save_run_state

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{hf,moe_llava,medpipe}" in help_text and EXPORT_FORMATS == ("hf", "moe_llava", "medpipe")
    for name in EXPORT_FORMATS:
        assert f"{name}:" in help_text

    cfg, built = _moe_model(tmp_path, tiny_clip, cache_dir, layers=[1], num_experts=2, top_k=1, meta_expert=True)
    run = tmp_path / "run"
    (run / "stages" / "stage3").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    handover = save_handover(built.model, run / "stages" / "stage3" / "handover.pt", stage="stage3")
    state = RunState(name=cfg.name)
    state.stage("stage3").status, state.stage("stage3").handover = "done", str(handover)
    save_run_state(state, run)
    out = tmp_path / "llava-moe-llama"
    assert main(["export", str(run), "--format", "moe_llava", "--out", str(out)]) == 0
    assert f"as moe_llava to {out}" in capsys.readouterr().out
    state_dict = load_file(str(out / "model.safetensors"))
    wg = built.model.llm.model.layers[1].mlp.router.linear.weight.detach()
    torch.testing.assert_close(state_dict["model.layers.1.mlp.deepspeed_moe.gate.wg.weight"], wg, atol=0, rtol=0)
    code = main(["export", str(run), "model.connector.aggregation=avgpool", "--format", "moe_llava", "--out",
                 str(tmp_path / "pooled")])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "model.connector.aggregation is 'avgpool'" in err
