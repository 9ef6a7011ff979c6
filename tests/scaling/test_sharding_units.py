"""Which modules FSDP2 wraps (``lightningmodules/sharding.py``): every transformer layer, and every module outside
one that owns parameters, so each part the model calls by itself gathers its own weights."""

from __future__ import annotations

from torch import nn


def test_units_cover_every_parameter_once_layers_whole(cache_dir) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    from lightningmodules.sharding import sharding_units
    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from tests.runs import DEMO

    cfg = load_config(DEMO, [f"cache_dir={cache_dir}"], check_paths=False)
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    units = sharding_units(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and units[: len(layers)] == layers  # LLM decoder layers and vision encoder layers, whole
    owner: dict[int, nn.Module] = {}
    for unit in units:  # a unit manages its parameters not already managed by a unit inside it
        for param in unit.parameters():
            owner.setdefault(id(param), unit)
    assert set(owner) == {id(p) for p in model.parameters()}
    names = {id(m): n for n, m in model.named_modules()}
    lm_head, embed = model.llm.get_output_embeddings(), model.llm.get_input_embeddings()
    assert {names[id(lm_head)], names[id(embed)]} <= {names[id(u)] for u in units}  # called on their own


def test_a_weight_two_modules_share_is_refused_naming_both() -> None:
    import pytest

    from lightningmodules.sharding import sharding_units

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    with pytest.raises(ValueError, match=r"^trainer.strategy fsdp2: embed and head share a weight \(tied embeddings\)"):
        sharding_units(Tied())


def test_tied_embeddings_under_fsdp2_fail_in_the_preflight_check(cache_dir) -> None:
    """Before anything trains: a model whose LM head shares the embedding table cannot be sharded by parts."""
    import pytest

    from pipeline.config import load_config
    from pipeline.model_factory import build_model
    from pipeline.preflight import PreflightError, check_stages
    from tests.runs import DEMO

    cfg = load_config(
        DEMO, [f"cache_dir={cache_dir}", "trainer.strategy=fsdp2", "trainer.devices=2"], check_paths=False
    )
    model = build_model(cfg.model, cache_dir=cfg.cache_dir, weights="none", device="meta").model
    check_stages(cfg, model)  # untied: fine
    model.llm.lm_head.weight = model.llm.get_input_embeddings().weight
    with pytest.raises(
        PreflightError, match=r"^stages.align: trainer.strategy fsdp2: llm.model.embed_tokens and llm.lm_head share"
    ):
        check_stages(cfg, model)
