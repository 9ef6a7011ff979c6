"""The four-stage MedPLIB chain at tiny size: weights handed over by value, one expert FFN per token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from medplib_helpers import tiny_cfg


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

    result = run_experiment(cfg, on_stage_start=snapshot)  # one thread: tiny.yaml's trainer.num_threads
    return result, starts, cfg


def _state(stage) -> dict[str, torch.Tensor]:
    return torch.load(stage.handover, weights_only=True)["state_dict"]


def _ffn(state: dict[str, torch.Tensor], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense Llama FFN in GroupedExperts layout: w_in (D, 2F) = [gate | up], w_out (F, D)."""
    prefix = f"llm.model.layers.{layer}.mlp."
    w_in = torch.cat([state[prefix + "gate_proj.weight"].T, state[prefix + "up_proj.weight"].T], dim=1)
    return w_in, state[prefix + "down_proj.weight"].T


@pytest.mark.slow
def test_stage_chain_hands_weights_over_by_value(chain) -> None:
    result, starts, _ = chain
    assert [s.name for s in result.stages] == ["alignment", "language_expert", "grounding_expert", "moe"]
    align, language, grounding, _ = (_state(s) for s in result.stages)
    # II starts from I's connector; III from II's connector and region adapter
    for key in [k for k in align if k.startswith("connector.")]:
        torch.testing.assert_close(starts[1][1][key], align[key], rtol=0, atol=0)
    for key in [k for k in language if k.startswith(("connector.", "region."))]:
        torch.testing.assert_close(starts[2][1][key], language[key], rtol=0, atol=0)
    assert any(not torch.equal(align[k], language[k]) for k in language if k.startswith("region."))  # II trained it
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
    for layer in range(layers):
        prefix = f"llm.model.layers.{layer}.mlp.experts."
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

    result, starts, _ = chain
    model = starts[3][0]
    layers = moe_layers(model)
    assert len(layers) == model.llm.config.num_hidden_layers  # every FFN
    batch_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad(), moe_context(model, attention) as context:
        model(batch_ids, attention)
    for name, layer in layers:
        assert layer.meta_expert is None and layer.top_k == 1 and layer.num_experts == 2, name
        computed = context.stats[layer].computed_rows  # rows each expert's FFN ran on
        assert sum(computed) == context.stats[layer].num_tokens == 9, (name, computed)  # 9 real tokens, once each
    # the hand-over of IV rebuilds the MoE structure for evaluation
    state = _state(result.stages[3])
    assert any(k.endswith("mlp.router.linear.weight") or ".router." in k for k in state)
    metrics = result.evaluation.metrics
    assert "seg/mdice" in metrics and "seg/mdice/CT" in metrics  # grounding, per modality
    assert metrics["region/closed_count"] + metrics["region/open_count"] == 4  # MeCoVQA-Region test records


@pytest.mark.slow
def test_grounded_moe_stage_logs_lm_mask_and_aux_losses(chain) -> None:
    """Stage IV trains the grounded model with MoE layers: the generic training step logs the LM loss,
    the mask losses of the grounding module's loss and the MoE aux loss side by side."""
    from mlflow.tracking import MlflowClient

    result, _, cfg = chain
    metrics = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(result.stages[3].run_id).data.metrics
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/ce", "train/bce", "train/dice"} <= set(metrics)
