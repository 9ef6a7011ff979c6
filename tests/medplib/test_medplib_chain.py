"""The four-stage MedPLIB chain at tiny size: weights handed over by value, one expert FFN per token."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from medplib_helpers import tiny_cfg
from runs import recording_handovers


def chain_overrides() -> list[str]:
    return [
        "model.grounding.sam_path=tiny:sam",  # random SAM: this test is about the hand-over, not masks
        "data.datasets.alignment.synthetic.train_images=16",
        "data.datasets.mecovqa_complex.synthetic.train_images=16",
        "data.datasets.mecovqa_complex.synthetic.test_images=4",
        "data.datasets.mecovqa_region.synthetic.train_images=16",
        "data.datasets.mecovqa_region.synthetic.test_images=4",
        "data.datasets.mecovqa_grounding.synthetic.train_images=16",
        "data.datasets.mecovqa_grounding.synthetic.test_images=4",
        "data.batch_size=8",
        "evaluation.batch_size=8",
        "evaluation.max_new_tokens=6",
        "stages.alignment.max_epochs=1",
        "stages.language_expert.max_epochs=1",
        "stages.grounding_expert.max_epochs=1",
        "stages.moe.max_epochs=1",
        "mlflow.system_metrics=false",
        "mlflow.register_model=false",
    ]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_clip: Path):
    """Run the tiny chain once: (result, {stage index: (model, state at the start of training)}, cfg)."""
    from pipeline.runner import run_experiment

    cfg = tiny_cfg(tmp_path_factory.mktemp("medplib-chain"), *chain_overrides())
    starts: dict[int, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}

    def snapshot(name: str, model: torch.nn.Module) -> None:
        starts[len(starts)] = (model, {k: v.detach().clone() for k, v in model.state_dict().items()})
        trainable[name] = {n: p.requires_grad for n, p in model.named_parameters()}

    trainable: dict[str, dict[str, bool]] = {}  # stage -> {parameter name: trainable} when its training starts
    with recording_handovers():  # each stage's model as handed over: what restoring its chain must give back
        result = run_experiment(cfg, on_stage_start=snapshot)  # one thread: tiny.yaml's trainer.num_threads
    return result, starts, cfg, trainable


@pytest.mark.slow
def test_each_stage_restores_bit_for_bit_from_its_delta_chain(chain) -> None:
    """Stage III's FFN LoRA and stage IV's per-expert LoRA (``ExpertLoRA``) travel as factors, merged on
    restore; IV's experts, routers and heads are new keys. Restored onto a fresh build, every stage's chain
    gives exactly the model that stage handed over."""
    from runs import HANDED_OVER

    from pipeline.handover import read_manifest

    result, _, cfg, _ = chain
    for stage in result.stages:
        expected = HANDED_OVER[str(stage.handover)]
        restored = _state(cfg, stage)
        assert restored.keys() == expected.keys(), stage.name
        assert all(torch.equal(restored[k], v) for k, v in expected.items()), stage.name
    moe = read_manifest(result.stages[3].handover)
    assert "experts" in moe["lora"]["target_modules"]  # the experts' adapters: factors in the delta


def _state(cfg, stage) -> dict[str, torch.Tensor]:
    from runs import full_state

    return full_state(cfg, stage.handover)


def _ffn(state: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense Llama FFN in GroupedExperts layout: w_in (D, 2F) = [gate | up], w_out (F, D)."""
    prefix = f"llm.model.layers.{layer}.mlp."
    w_in = torch.cat([state[prefix + "gate_proj.weight"].T, state[prefix + "up_proj.weight"].T], dim=1)
    return w_in, state[prefix + "down_proj.weight"].T


@pytest.mark.slow
def test_stage_chain_hands_weights_over_by_value(chain) -> None:
    result, starts, cfg, _ = chain
    assert [s.name for s in result.stages] == ["alignment", "language_expert", "grounding_expert", "moe"]
    align, language, grounding, _ = (_state(cfg, s) for s in result.stages)
    # II starts from I's connector; III from II's connector and region adapter
    for key in [k for k in align if k.startswith("connector.")]:
        torch.testing.assert_close(starts[1][1][key], align[key], rtol=0, atol=0)
    for key in [k for k in language if k.startswith(("connector.", "region."))]:
        torch.testing.assert_close(starts[2][1][key], language[key], rtol=0, atol=0)
    # the region adapter stays frozen in II (not in its --sft_modules): it first trains in IV
    assert all(torch.equal(align[k], language[k]) for k in language if k.startswith("region."))
    # III's LoRA sits on the FFN only: attention is II's, the FFN changed, the mask decoder trained
    layers = sum(1 for k in language if k.endswith("mlp.down_proj.weight"))
    for layer in range(layers):
        key = f"llm.model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(grounding[key], language[key], rtol=0, atol=0)
    assert any(not torch.equal(_ffn(grounding, i)[1], _ffn(language, i)[1]) for i in range(layers))
    decoder = [k for k in grounding if k.startswith("grounding.sam.mask_decoder.upscale_conv1")]
    assert decoder and any(not torch.equal(grounding[k], language[k]) for k in decoder)
    # IV: every FFN is two experts, expert 0 = III's FFN and expert 1 = II's, exactly as handed over
    moe_start = starts[3][1]
    peft = "llm.base_model.model."  # stage IV's q_proj / v_proj LoRA wraps the LLM in peft
    for layer in range(layers):
        prefix = f"{peft}model.layers.{layer}.mlp.experts."
        for expert, source in ((0, grounding), (1, language)):
            w_in, w_out = _ffn(source, layer)
            torch.testing.assert_close(moe_start[prefix + "w_in"][expert], w_in, rtol=0, atol=0)
            torch.testing.assert_close(moe_start[prefix + "w_out"][expert], w_out, rtol=0, atol=0)
    # ... and the rest of IV starts as III ended (grounding head included)
    for key in [k for k in grounding if k.startswith(("grounding.", "connector.", "region."))]:
        torch.testing.assert_close(moe_start[key], grounding[key], rtol=0, atol=0)


@pytest.mark.slow
def test_stage_four_runs_exactly_one_expert_ffn_per_token(chain) -> None:
    from lightningmodules.models.moe import moe_context, moe_layers

    result, starts, cfg, _ = chain
    model = starts[3][0]
    layers = moe_layers(model)
    assert len(layers) == model.llm.config.num_hidden_layers  # every FFN
    batch_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    model.eval()  # evaluation capacity 2.0: nothing dropped (training's 1.5: the router test below)
    with torch.no_grad(), moe_context(model, attention) as context:
        model(batch_ids, attention)
    for name, layer in layers:
        assert layer.meta_expert is None and layer.top_k == 1 and layer.num_experts == 2, name
        computed = context.stats[layer].computed_rows  # rows each expert's FFN ran on
        # 12 rows (9 real, 3 padding), each computed exactly once: the release's gate routes padding too
        assert layer.capacity.count_padding and sum(computed) == context.stats[layer].num_tokens == 12, computed
    # the hand-over of IV rebuilds the MoE structure for evaluation
    state = _state(cfg, result.stages[3])
    assert any(k.endswith("mlp.router.linear.weight") or ".router." in k for k in state)
    metrics = result.evaluation.metrics
    assert "seg/mdice" in metrics and "seg/mdice/CT" in metrics  # grounding, per modality
    assert metrics["region/closed_count"] + metrics["region/open_count"] == 4  # MeCoVQA-Region test records


@pytest.mark.slow
def test_grounded_moe_stage_logs_lm_mask_and_aux_losses(chain) -> None:
    """Stage IV trains the grounded model with MoE layers: the generic training step logs the LM loss,
    the mask losses of the grounding module's loss and the MoE aux loss side by side."""
    from mlflow.tracking import MlflowClient

    result, _, cfg, _ = chain
    metrics = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.stages[3].run_id).data.metrics
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/ce", "train/bce", "train/dice"} <= set(metrics)


# What each released stage script trains (MedPLIB 5ab54bc train_ds_medplib.py:263-326): LoRA on the Linears whose
# names contain a target, then every parameter whose name contains an --sft_modules entry (scripts/train_stage*.sh).
RELEASED = {
    "language_expert": (
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
        {"lm_head", "embed_tokens", "input_layernorm", "post_attention_layernorm", "mm_projector"},
    ),
    "grounding_expert": ({"gate_proj", "up_proj", "down_proj"}, {"mask_decoder", "text_hidden_fcs"}),
    "moe": (
        {"gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"},
        {"wg", "lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs", "region_fea_adapter"},
    ),
}
# our module names -> the released code's, to apply its substring rules to our parameter names
RELEASED_NAMES = (
    ("connector.", "mm_projector."),
    ("grounding.seg_projection.", "text_hidden_fcs."),
    ("grounding.sam.mask_decoder.", "mask_decoder."),
    ("region.adapter.", "region_fea_adapter."),
    (".router.linear.", ".wg."),
)


# mask-decoder parts that never shape MedPLIB's single mask: the released code marks them trainable, they get no
# gradient, and AdamW with weight decay 0 leaves them unchanged; medpipe keeps them frozen
def _no_gradient(released_name: str) -> bool:
    return "mask_decoder.iou_prediction_head." in released_name or (
        "mask_decoder.output_hypernetworks_mlps." in released_name
        and "mask_decoder.output_hypernetworks_mlps.0." not in released_name
    )


def _released_name(name: str) -> str:
    for ours, theirs in RELEASED_NAMES:
        name = name.replace(ours, theirs)
    return name


@pytest.mark.slow
def test_each_stage_trains_exactly_what_the_released_script_trains(chain) -> None:
    from lightningmodules.models.moe import moe_layers

    _, starts, _, trainable = chain
    names = list(trainable)
    for name, (lora_targets, sft_modules) in RELEASED.items():
        model = starts[names.index(name)][0]
        released = {n: _released_name(n) for n in trainable[name] if "lora_" not in n}
        full = {n for n, r in released.items() if any(m in r for m in sft_modules) and not _no_gradient(r)}
        ours = {n for n, on in trainable[name].items() if on}
        ours_full = {n for n in ours if "lora_" not in n}
        assert ours_full == full, (name, sorted(ours_full ^ full)[:10])
        # LoRA: on exactly the Linears whose names end with a released target; stage IV's FFN targets sit on the
        # experts of every MoE layer (LoRA put on before the MoE wrap: one adapter per expert copy)
        lora_modules = {n.split(".lora_")[0] for n in ours if ".lora_A." in n}
        suffixes = {m.rsplit(".", 1)[-1] for m in lora_modules}
        expert_lora = {n.split(".lora.")[0] for n in ours if ".experts.lora." in n}
        if name == "moe":
            assert suffixes == {"q_proj", "v_proj"}
            layers = {int(re.search(r"layers\.(\d+)\.mlp", n).group(1)) for n in expert_lora}
            assert expert_lora and layers == set(range(len(moe_layers(model))))  # every MoE layer, once
        else:
            assert suffixes == lora_targets and not expert_lora
        assert all(any(t in n for t in lora_targets) for n in lora_modules)


@pytest.mark.slow
def test_stage_four_router_learns_and_drops_tokens_only_in_training(chain) -> None:
    from lightningmodules.models.moe import moe_context, moe_layers

    result, starts, cfg, _ = chain
    model = starts[3][0]
    start = starts[3][1]
    state = _state(cfg, result.stages[3])
    routers = [k for k in state if k.endswith(".router.linear.weight")]
    assert routers and not any(k.endswith(".router.linear.bias") for k in state)  # Linear(d, 2) without bias
    at_start = {k: start[k.replace("llm.", "llm.base_model.model.", 1)] for k in routers}  # peft-wrapped then
    changed = [k for k in routers if not torch.equal(state[k], at_start[k])]
    assert len(changed) == len(routers), f"{len(changed)} of {len(routers)} routers changed"
    layer = moe_layers(model)[0][1]
    assert layer.capacity.factor == 1.5 and layer.capacity.eval_factor == 2.0 and layer.capacity.drop == "random"
    ids = torch.arange(5, 45).view(2, 20)  # 40 real tokens
    attention = torch.ones_like(ids)
    with torch.no_grad():
        with moe_context(model, attention) as context:
            model.train()
            model(ids, attention)
        trained = [context.stats[m] for _, m in moe_layers(model)]
        with moe_context(model, attention) as context:
            model.eval()
            model(ids, attention)
        evaluated = [context.stats[m] for _, m in moe_layers(model)]
    assert all(s.capacity == 30 for s in trained)  # ceil(1.5 * 40 / 2)
    assert all(s.dropped == max(0, int(s.routed_counts.max()) - 30) for s in trained)
    assert all(s.capacity == 40 and s.dropped == 0 for s in evaluated)  # ceil(2.0 * 40 / 2): nothing dropped
