"""`model.connector.type=cmoe` from the config to a working MultimodalLM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
CMOE = [
    "model.connector.type=cmoe",
    "model.connector.aggregation=concat4",
    "model.connector.num_experts=3",
    "model.connector.router_hidden_ratio=0.5",
    "model.connector.num_tasks=6",
]


def test_defaults_are_the_papers() -> None:
    connector = load_config(DEMO, ["model.connector.type=cmoe"]).model.connector
    assert (
        connector.num_experts,
        connector.router_input,
        connector.weighting,
        connector.top_k,
        connector.router_hidden_ratio,
        connector.num_tasks,
        connector.task_embed_dim,
    ) == (5, "task_token", "soft", 2, 4.0, 6, None)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.connector.weighting=dense", "model.connector.weighting"),
        ("model.connector.router_input=image", "model.connector.router_input"),
        ("model.connector.num_experts=0", "model.connector.num_experts"),
        ("model.connector.router_hidden_ratio=-1", "model.connector.router_hidden_ratio"),
        ("model.connector.task_embed_dim=0", "model.connector.task_embed_dim"),
    ],
)
def test_bad_cmoe_settings_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"command line: key '{key}'"):
        load_config(DEMO, ["model.connector.type=cmoe", override])


def test_top_k_above_the_expert_count_is_rejected_for_sparse() -> None:
    with pytest.raises(ConfigError, match="model.connector.top_k"):
        load_config(DEMO, [*CMOE, "model.connector.weighting=sparse", "model.connector.top_k=4"])


@pytest.mark.parametrize("weighting", ["soft", "sparse"])
def test_config_round_trip_builds_a_working_cmoe_model(weighting: str, cache_dir, tiny_llama, tiny_clip) -> None:
    from lightningmodules.models.cmoe import CMoEConnector
    from lightningmodules.models.moe import moe_context
    from pipeline.model_factory import build_model
    from pipeline.trainable import set_trainable

    torch.manual_seed(0)
    cfg = load_config(DEMO, [*CMOE, f"model.connector.weighting={weighting}"])
    built = build_model(cfg.model, cache_dir=cache_dir)
    model = built.model.eval()
    connector = model.connector
    assert isinstance(connector, CMoEConnector)
    assert connector.num_experts == 3 and connector.weighting == weighting
    assert connector.in_dim == 4 * model.vision.hidden_size  # concat4
    task_dim = min(768, connector.in_dim)  # the default task embedding width
    assert connector.router.task_embedding.weight.shape == (6, task_dim)
    assert connector.router.fc1_token.out_features == round(0.5 * (connector.in_dim + task_dim))

    size = model.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    task_ids = torch.tensor([1, 4, 1])
    with torch.no_grad(), moe_context(model) as context:
        visual = model.encode_images(pixels, task_ids=task_ids)
    assert visual.shape == (3, model.num_image_tokens, model.llm.config.hidden_size)
    assert torch.isfinite(visual).all()
    assert torch.equal(context.routing[connector].group_ids, task_ids)
    with pytest.raises(ValueError, match="needs task_ids"):
        model.encode_images(pixels)

    # the whole model: two images of different tasks, a loss and gradients into the router
    text = built.tokenizer("a phantom scan", add_special_tokens=False).input_ids
    row = [model.image_token_id] * model.num_image_tokens + text
    input_ids = torch.tensor([row, row])
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=input_ids,
        pixel_values=pixels[:2],
        image_task_ids=task_ids[:2],
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert connector.router.task_embedding.weight.grad[[1, 4]].abs().sum() > 0

    counts = set_trainable(model, ["connector"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "connector.router.task_embedding.weight" in trainable and "connector.experts.w_in" in trainable
    assert counts["connector"] == sum(p.numel() for p in connector.parameters())
