"""Med-MoE pipeline pieces without training: structure hand-over, trainable groups, config checks, params."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightningmodules.models.modality_router import ModalityClassifier, masked_mean
from lightningmodules.models.moe import count_parameters, moe_context, moe_layers
from pipeline.config import ConfigError, load_config
from pipeline.handover import load_handover, restore, save_handover
from pipeline.model_factory import build_model
from pipeline.structure import add_modality_classifier, add_moe, model_structure
from pipeline.trainable import parameter_groups, set_moe_routers_trainable, set_trainable

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "experiments" / "med_moe" / "tiny.yaml"


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides), check_paths=False)


def _built(family: str):
    cfg = _cfg(f"model.llm.path=tiny:{family}")
    torch.manual_seed(0)
    return build_model(cfg.model, cache_dir=cfg.cache_dir)


def _batch(vocab: int):
    input_ids = torch.randint(5, vocab, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_masked_mean_pool_by_hand() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)  # (B, T, D)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = torch.tensor([[(0 + 2) / 2, (1 + 3) / 2], [(8 + 10) / 2, (9 + 11) / 2]])
    torch.testing.assert_close(masked_mean(hidden, mask), expected)
    classifier = ModalityClassifier(hidden_size=2, modalities=["CT", "MRI", "X-Ray"])
    torch.testing.assert_close(
        classifier(hidden, mask), expected @ classifier.linear.weight.t() + classifier.linear.bias
    )


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_moe_structure_survives_handover(family: str, tmp_path: Path) -> None:
    """A stage after an MoE stage (and evaluate / registry: they all call restore) rebuilds the MoE first."""
    built = _built(family)
    model = built.model
    add_modality_classifier(model, ["CT", "MRI", "X-Ray"])
    classifier = model.modality_classifier.linear
    entry = add_moe(
        model,
        layers="every_other",
        num_experts=3,
        top_k=1,
        meta_expert=True,
        router_init=classifier,
        aux_loss_coef=0.01,
    )
    assert entry["layers"] == list(range(model.llm.config.num_hidden_layers))[::2]
    with torch.no_grad():  # make the experts differ from copies of the dense FFN
        for _, layer in moe_layers(model):
            layer.experts.w_in.add_(0.05 * torch.randn_like(layer.experts.w_in))
    path = save_handover(model, tmp_path / "handover.pt", stage="stage3")
    assert load_handover(path)["meta"]["structure"] == model_structure(model)

    fresh = _built(family).model
    assert not moe_layers(fresh)
    restore(fresh, path)
    assert [n for n, _ in moe_layers(fresh)] == [n for n, _ in moe_layers(model)]
    assert model_structure(fresh) == model_structure(model)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    batch = _batch(len(built.tokenizer))
    model.eval(), fresh.eval()
    with torch.no_grad(), moe_context(model, batch["attention_mask"]), moe_context(fresh, batch["attention_mask"]):
        a, b = model(**batch), fresh(**batch)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    # the router rows are the classifier's (Linear with bias)
    layer = moe_layers(fresh)[0][1]
    assert torch.equal(layer.router.linear.weight, classifier.weight)
    assert torch.equal(layer.router.linear.bias, classifier.bias)
    assert layer.load_balance_coef == 0.01


def test_trainable_groups_for_stage3() -> None:
    model = _built("llama").model
    add_moe(model, layers="every_other", num_experts=3)
    groups = parameter_groups(model)
    moe_names = [n for n, _ in moe_layers(model)]
    assert groups["moe_router"] == [f"{n}.router.linear.{p}" for n in moe_names for p in ("weight", "bias")]
    assert all(".experts." in n or ".meta_expert." in n for n in groups["experts"])
    assert set(groups["experts"]) < set(groups["ffn"]) and not set(groups["moe_router"]) & set(groups["ffn"])
    dense_ffn = [n for n in groups["ffn"] if not any(n.startswith(m + ".") for m in moe_names)]
    assert dense_ffn and all(".mlp." in n for n in dense_ffn)  # the non-MoE layers' FFNs
    assert not any("self_attn" in n or "norm" in n or "embed" in n for n in groups["ffn"])
    counts = set_trainable(model, ["connector", "ffn"])
    frozen = set_moe_routers_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups["connector"]) | set(groups["ffn"])
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n in set(groups["moe_router"]))
    assert counts["ffn"] == sum(p.numel() for n, p in model.named_parameters() if n in set(groups["ffn"]))


def test_params_command_json_matches_the_built_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "params", str(TINY), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["device"] == "meta" and result["stage"] == "stage3"
    model = _built("llama").model
    add_modality_classifier(model, ["CT", "MRI", "X-Ray"])
    add_moe(model, layers="every_other", num_experts=3, top_k=1, meta_expert=True)
    expected = count_parameters(model)
    assert result["total"] == expected["total"] == sum(p.numel() for p in model.parameters())
    assert result["active_per_token"] == expected["active_per_token"]
    # by hand: 2 of the 3 expert copies per MoE layer are inactive for a token
    ffn = sum(p.numel() for p in model.llm.get_decoder().layers[1].mlp.parameters())  # a dense layer's FFN
    assert result["total"] - result["active_per_token"] == result["moe_layers"] * 2 * ffn
    assert result["experts_total"] == result["moe_layers"] * 3 * ffn


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(f"defaults: [{TINY}]\n" + body)
    return path


@pytest.mark.parametrize(
    "body, key",
    [
        ("stages: {stage3: {moe: {num_experts: 4}}}\n", "stages.stage3.moe.num_experts"),
        ("stages: {stage3: {moe: {layers: some}}}\n", "stages.stage3.moe.layers"),
        ("stages: {stage3: {moe: {top_k: 5}}}\n", "stages.stage3.moe.top_k"),
        ("stages: {stage3: {moe: {router_init: classifier}}}\n", "stages.stage3.moe.router_init"),
        (
            "stages: {stage3: {moe: {sources: [stage2, nowhere], router_init: random, num_experts: null}}}\n",
            "stages.stage3.moe.sources",
        ),
        ("stages: {router: {train: [connector]}}\n", "stages.router.train"),
        ("stages: {router: {router: {modalities: [CT]}}}\n", "stages.router.router.modalities"),
        ("stages: {stage3: {train: [connector, moe_router]}}\n", "stages.stage3.train"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, body: str, key: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ConfigError) as error:
        load_config(path, [], check_paths=False)
    assert f"key '{key}'" in str(error.value) and str(path) in str(error.value)


def test_sources_config_for_medplib_is_valid(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "stages: {stage3: {moe: {sources: [stage2, stage1], layers: all, meta_expert: false, "
        "router_init: random, num_experts: null}}}\n",
    )
    cfg = load_config(path, [], check_paths=False)
    assert list(cfg.stages.stage3.moe.sources) == ["stage2", "stage1"]


def test_every_med_moe_config_loads() -> None:
    files = sorted((REPO / "experiments" / "med_moe").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        cfg = load_config(path, [], check_paths=False)
        assert cfg.stages or cfg.ckpt is not None or cfg.evaluation.enabled, path


def test_vlm_module_adds_weighted_aux_loss_over_real_tokens() -> None:
    from lightningmodules.vlm_module import VLMModule

    built = _built("llama")
    model = built.model
    add_moe(model, layers="all", num_experts=3, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.25)
    for _, layer in moe_layers(model):
        torch.nn.init.normal_(layer.router.linear.weight, std=0.5)
    module = VLMModule(model=model, tokenizer=built.tokenizer)
    batch = _batch(len(built.tokenizer))
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        with moe_context(model, batch["attention_mask"]):
            lm_loss = model(**batch).loss
    real = int(batch["attention_mask"].sum())
    expected_aux = 0.0
    for _, layer in moe_layers(model):
        stats = module.moe.context.stats[layer]  # the training step's context
        assert stats.num_tokens == real and int(stats.routed_counts.sum()) == real  # padding not routed
        expected_aux += 0.5 * float(stats.load_balancing_loss) + 0.25 * float(stats.z_loss)
    assert expected_aux > 0
    torch.testing.assert_close(float(loss), float(lm_loss) + expected_aux, rtol=1e-5, atol=1e-6)
    metrics = module.moe.step_metrics(None)
    assert sum(metrics[f"moe/layer0/load_expert{e}"] for e in range(3)) == pytest.approx(1.0)
    assert metrics["moe/dropped"] == 0.0
    module.moe.end()
    assert all(layer.moe_context is None for _, layer in moe_layers(model))
