"""``moe.sources`` end to end (MedPLIB stage IV): a later stage builds its MoE from earlier stages' FFNs.

A tiny three-stage chain through the runner: ``expert_a`` trains LoRA on the FFN projections (merged into
its hand-over), ``expert_b`` starts from it and trains the FFNs directly, then ``moe`` starts from
``expert_b`` and turns every decoder FFN into two experts, ``sources: [expert_b, expert_a]`` (the order
MedPLIB uses: expert 0 = the later stage), top-1, renormalised, no meta expert, trainable router. Checked
by value: expert e of every layer equals source stage e's FFN; after training the experts are unchanged
(only the router trains) and every real token ran exactly one expert FFN (router counts, expert-load
artifact, and a forward of the rebuilt model compared with the source FFNs themselves).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
defaults: [{defaults}]
name: moe_sources_tiny
model:
  connector: {{type: mlp, aggregation: avgpool}}
data:
  datasets:
    phantom_slake:
      format: slake
      path: ${{output_dir}}/data/phantom_slake
      synthetic: {{train_images: 8, val_images: 2, test_images: 0, questions_per_image: 2, seed: 0}}
  batch_size: 8
stages:
  expert_a:
    train: [lora]
    lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [gate_proj, up_proj, down_proj]}}
    optim: {{lr: 5.0e-3, warmup_ratio: 0.0, scheduler: constant}}
    max_steps: 2
  expert_b:
    train: [ffn]
    optim: {{lr: 5.0e-3, warmup_ratio: 0.0, scheduler: constant}}
    max_steps: 2
  moe:
    init_from: expert_b
    train: [moe_router]
    moe:
      layers: all
      sources: [expert_b, expert_a]
      top_k: 1
      meta_expert: false
      renormalize: true
      router_trainable: true
    optim: {{lr: 1.0e-2, warmup_ratio: 0.0, scheduler: constant}}
    max_steps: 2
trainer: {{enable_progress_bar: false, log_every_n_steps: 1, save_checkpoints: false}}
evaluation: {{enabled: false}}
mlflow: {{experiment_name: moe-sources, system_metrics: false, register_model: false}}
"""

SOURCES = ("expert_b", "expert_a")  # expert e = stage SOURCES[e]


@pytest.fixture(scope="module")
def sources_chain(tmp_path_factory, tiny_llama, tiny_clip):
    from runs import run_with_snapshots

    from pipeline.config import load_config

    tmp = tmp_path_factory.mktemp("moe-sources")
    config = tmp / "sources.yaml"
    config.write_text(CONFIG.format(defaults=REPO / "experiments" / "defaults.yaml"))
    cfg = load_config(config, [f"output_dir={tmp}/out", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db"])
    result, snapshots = run_with_snapshots(cfg)
    handovers = {s.name: s.handover for s in result.stages}
    return cfg, result, snapshots, handovers


def _state(cfg, path: Path) -> dict[str, torch.Tensor]:
    """Every weight of the model a hand-over restores (the base checkpoints plus the chain's deltas)."""
    from runs import full_state

    return full_state(cfg, path)


def _ffn_as_expert(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The dense Llama FFN at ``prefix`` in GroupedExperts layout: w_in (D, 2F) = [gate | up], w_out (F, D)."""
    return {
        "w_in": torch.cat([state[f"{prefix}.gate_proj.weight"].t(), state[f"{prefix}.up_proj.weight"].t()], dim=1),
        "w_out": state[f"{prefix}.down_proj.weight"].t(),
    }


def _mlp_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".experts.", 1)[0] for k in state if k.endswith(".mlp.experts.w_in")})


@pytest.mark.slow
def test_experts_are_the_source_stages_ffns(sources_chain) -> None:
    cfg, result, snapshots, handovers = sources_chain
    assert [s.name for s in result.stages] == ["expert_a", "expert_b", "moe"]
    a, b = _state(cfg, handovers["expert_a"]), _state(cfg, handovers["expert_b"])
    assert not any("lora" in k for k in a)  # LoRA merged when the hand-over is restored
    ffn_keys = [k for k in a if ".mlp." in k]
    assert any(not torch.equal(a[k], b[k]) for k in ffn_keys)  # the two sources really differ
    start = snapshots["moe"]
    prefixes = _mlp_prefixes(start)
    dense = sorted(k.removesuffix(".gate_proj.weight") for k in b if k.endswith(".mlp.gate_proj.weight"))
    assert prefixes == dense and len(prefixes) >= 2  # layers: all
    sources = {name: _state(cfg, handovers[name]) for name in SOURCES}
    for prefix in prefixes:
        assert start[f"{prefix}.experts.w_in"].shape[0] == 2
        assert not any(k.startswith(f"{prefix}.meta_expert.") for k in start)  # meta_expert: false
        for e, name in enumerate(SOURCES):
            for key, value in _ffn_as_expert(sources[name], prefix).items():
                assert torch.equal(start[f"{prefix}.experts.{key}"][e], value), (prefix, key, e, name)
    # everything outside the FFNs starts from expert_b (init_from), routers are new
    for key, value in b.items():
        if not any(key.startswith(p + ".") for p in prefixes):
            assert torch.equal(start[key], value), key


@pytest.mark.slow
def test_only_the_router_trains_and_one_expert_runs_per_token(sources_chain) -> None:
    from mlflow.tracking import MlflowClient

    cfg, result, snapshots, handovers = sources_chain
    start, final = snapshots["moe"], _state(cfg, handovers["moe"])
    prefixes = _mlp_prefixes(final)
    for key, value in final.items():
        if ".router." in key:
            continue
        assert torch.equal(value, start[key]), key  # train: [moe_router]
    assert all(
        not torch.equal(final[f"{p}.router.linear.weight"], start[f"{p}.router.linear.weight"]) for p in prefixes
    )

    # expert-load artifact: per layer, assignments summed over experts = the real tokens the stage trained on
    summary = json.loads((Path(cfg.output_dir) / "stages" / "moe" / "expert_load.json").read_text())
    per_layer = {label: sum(map(sum, layer["by_modality"].values())) for label, layer in summary["layers"].items()}
    assert len(per_layer) == len(prefixes) and len(set(per_layer.values())) == 1 and summary["dropped_total"] == 0
    assert all(layer["top_k"] == 1 and layer["experts"] == 2 for layer in summary["layers"].values())
    metrics = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.stages[-1].run_id).data.metrics
    assert metrics["moe/layer0/load_expert0"] + metrics["moe/layer0/load_expert1"] == pytest.approx(1.0)


@pytest.mark.slow
def test_rebuilt_moe_runs_exactly_one_source_ffn_per_real_token(sources_chain) -> None:
    """The stage's hand-over, rebuilt (structure replayed) and run on a padded batch: every layer computes
    each real token in exactly one expert (router counts = group sizes, summing to the real tokens), and
    its output is that source stage's own FFN module on the token (weight 1: renormalised top-1)."""
    from lightningmodules.models.moe import moe_context, moe_layers
    from pipeline.handover import restore
    from pipeline.model_factory import build_model

    cfg, _, _, handovers = sources_chain
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    restore(model, handovers["moe"])
    model.eval()
    source_models = []
    for name in SOURCES:
        source = build_model(cfg.model, cache_dir=cfg.cache_dir).model
        restore(source, handovers[name])
        source_models.append(source.eval())

    torch.manual_seed(0)
    input_ids = torch.randint(5, 100, (3, 12))  # (B, T), text only
    attention_mask = torch.ones(3, 12, dtype=torch.long)  # (B, T)
    attention_mask[1, 9:] = 0
    attention_mask[2, 4:] = 0  # 12 + 9 + 4 = 25 real tokens
    real = int(attention_mask.sum())
    layers = dict(moe_layers(model))
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, (args[0], out)))
        for name, layer in layers.items()
    ]
    with torch.no_grad(), moe_context(model, attention_mask) as context:
        model(input_ids=input_ids, attention_mask=attention_mask)
    for hook in hooks:
        hook.remove()
    assert len(layers) >= 2
    mask = attention_mask.bool()  # (B, T)
    for name, layer in layers.items():
        stats = context.stats[layer]
        assert stats.num_tokens == real and int(stats.routed_counts.sum()) == real
        assert stats.kept_counts.tolist() == stats.routed_counts.tolist() == stats.computed_rows
        x, out = captured[name]  # (B, T, D) each
        chosen = context.routing[layer].indices[..., 0]  # (B, T)
        index = int(name.split(".layers.")[1].split(".")[0])
        with torch.no_grad():
            expected = torch.stack(
                [source.llm.get_decoder().layers[index].mlp(x) for source in source_models]
            )  # (2, B, T, D)
        assert float((expected[0] - expected[1])[mask].abs().max()) > 1e-3  # the sources' FFNs tell apart
        reference = torch.where(chosen.unsqueeze(-1) == 0, expected[0], expected[1])  # (B, T, D)
        torch.testing.assert_close(out[mask], reference[mask], rtol=1e-5, atol=1e-5)
        assert float(out[~mask].abs().max()) == 0.0  # padding: no expert ran
    assert any(min(context.stats[layer].routed_counts.tolist()) > 0 for layer in layers.values())  # both experts used
