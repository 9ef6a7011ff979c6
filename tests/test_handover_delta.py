"""Hand-overs are deltas: a manifest naming the base checkpoints and the previous hand-over, plus safetensors of
only what a stage changed. Restoring a chain gives back, bit for bit, the model each stage ended with; a
broken chain fails in one line naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runs import HANDED_OVER, full_state
from torch import nn

from pipeline.safe_load import NotAHandoverError

# -- the tiny chains ----------------------------------------------------------------------------------


def _bytes(state: dict[str, torch.Tensor], tmp: Path) -> int:
    """The size the hand-over had before deltas: one torch.save file of every weight (format 1)."""
    path = tmp / "full.pt"
    torch.save({"format": 1, "stage": "x", "meta": {}, "state_dict": state}, path)
    return path.stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tiny_demo_run", "tiny_med_moe_run", "tiny_cmoe_run"])
def test_restoring_each_stage_gives_back_the_model_it_handed_over(run: str, request, tmp_path: Path) -> None:
    from pipeline.handover import handover_bytes, read_manifest

    cfg, result = request.getfixturevalue(run)[:2]
    for i, stage in enumerate(result.stages):
        expected = HANDED_OVER[str(stage.handover)]  # the stage's model as it handed over, LoRA merged
        restored = full_state(cfg, stage.handover)  # built from the base checkpoints + the chain's deltas
        assert restored.keys() == expected.keys(), stage.name
        for key, value in expected.items():
            assert torch.equal(restored[key], value), (stage.name, key)
        manifest = read_manifest(stage.handover)
        assert manifest["previous"] == (None if i == 0 else f"../{result.stages[i - 1].name}/handover.json")
        sizes = handover_bytes(stage.handover)
        before = _bytes(expected, tmp_path)
        print(f"{run} {stage.name}: delta {sizes['own']:,} B (chain {sizes['chain']:,} B), full file {before:,} B")
        assert sizes["own"] < before, stage.name


@pytest.mark.slow
def test_a_delta_holds_only_what_the_stage_changed(tiny_demo_run, tiny_med_moe_run) -> None:
    from pipeline.handover import load_handover, read_manifest

    cfg, result = tiny_demo_run[:2]
    align = load_handover(result.stages[0].handover)["state_dict"]
    assert sorted(align) == sorted(k for k in HANDED_OVER[str(result.stages[0].handover)] if k.startswith("connector."))
    cfg, result = tiny_med_moe_run[:2]
    by_name = {s.name: s for s in result.stages}
    router = read_manifest(by_name["router"].handover)
    # the router stage: only the new classifier, none of the frozen model
    own = (
        load_handover(by_name["router"].handover)["state_dict"].keys()
        - load_handover(by_name["stage2"].handover)["state_dict"].keys()
    )
    assert own == {"modality_classifier.linear.weight", "modality_classifier.linear.bias"}
    assert router["lora"] is None and [e["kind"] for e in router["structure"]] == ["modality_classifier"]
    # stage 3: the MoE layers it added (experts, routers, meta experts), nothing outside them
    stage3 = read_manifest(by_name["stage3"].handover)
    delta = set(load_handover(by_name["stage3"].handover)["state_dict"]) - set(
        load_handover(by_name["router"].handover)["state_dict"]
    )
    assert delta and all(".mlp." in k for k in delta)
    assert any(".experts.w_in" in k for k in delta) and any(".router.linear." in k for k in delta)
    assert [e["kind"] for e in stage3["structure"]] == ["modality_classifier", "moe"]


@pytest.mark.slow
def test_the_registered_chain_and_the_full_copy_restore_the_same_model(tiny_demo_run, tmp_path: Path) -> None:
    from pipeline.handover import copy_chain, read_manifest, restore
    from pipeline.model_factory import build_model

    cfg, result = tiny_demo_run[:2]
    last = result.stages[-1].handover
    expected = HANDED_OVER[str(last)]
    folder = tmp_path / "registered"
    manifest = copy_chain(last, folder)
    assert manifest == folder / "handover.json"
    assert read_manifest(manifest)["previous"] == "previous/0-align/handover.json"
    assert torch_equal(full_state(cfg, manifest), expected)
    model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
    restore(model, last)
    complete = copy_chain(last, tmp_path / "full", complete=True, model=model)
    assert read_manifest(complete)["complete"] and read_manifest(complete)["previous"] is None
    assert torch_equal(full_state(cfg, complete), expected)


def torch_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- broken chains, one line each -------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.connector = nn.Linear(3, 2)
        self.llm = nn.Linear(2, 2)


def _chain(tmp_path: Path) -> tuple[Tiny, Path, Path]:
    """A two-link chain over a Tiny model: first the connector changes, then the LLM."""
    from pipeline.handover import save_handover

    torch.manual_seed(0)
    model = Tiny()
    base = {"llm": "tiny:llama", "vision": "tiny:clip", "init": None, "sam": None}
    with torch.no_grad():
        model.connector.weight.add_(1.0)
    first = save_handover(model, tmp_path / "a" / "handover.json", stage="a", changed=["connector.weight"], base=base)
    with torch.no_grad():
        model.llm.weight.add_(1.0)
    second = save_handover(
        model, tmp_path / "b" / "handover.json", stage="b", changed=["llm.weight"], previous=first, base=base
    )
    return model, first, second


def _fresh() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def test_a_chain_restores_both_links_and_nothing_else(tmp_path: Path) -> None:
    from pipeline.handover import restore

    trained, _, second = _chain(tmp_path)
    fresh = _fresh()
    restore(fresh, second)
    assert torch_equal(fresh.state_dict(), trained.state_dict())
    assert json.loads(second.read_text())["previous"] == "../a/handover.json"


def test_a_changed_delta_file_is_named_with_the_manifest_field(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from pipeline.handover import restore

    _, first, second = _chain(tmp_path)
    save_file({"connector.weight": torch.zeros(2, 3)}, str(first.with_suffix(".safetensors")))
    with pytest.raises(NotAHandoverError) as info:
        restore(_fresh(), second)
    assert str(info.value) == (
        f"{first.with_suffix('.safetensors')}: SHA-256 differs from {first}'s field 'delta[0].sha256' (changed?)"
    )


def test_a_missing_previous_names_the_manifest_that_points_to_it(tmp_path: Path) -> None:
    from pipeline.handover import restore

    _, first, second = _chain(tmp_path)
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{first}: hand-over not found \(named as 'previous' by {second}\)"):
        restore(_fresh(), second)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("delta", [{"file": "../escape.safetensors", "sha256": "0"}], "field 'delta[0].file'"),
        ("delta", [{"file": "/etc/passwd", "sha256": "0"}], "field 'delta[0].file'"),
        ("version", 3, "field 'version': expected 2, got 3"),
        ("structure", "moe", "field 'structure'"),
        ("lora", {"r": 4}, "field 'lora'"),
        ("previous", 7, "field 'previous'"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_the_field(tmp_path: Path, field: str, value, message: str) -> None:
    from pipeline.handover import restore

    _, _, second = _chain(tmp_path)
    data = json.loads(second.read_text())
    data[field] = value
    second.write_text(json.dumps(data))
    with pytest.raises(NotAHandoverError) as info:
        restore(_fresh(), second)
    assert str(info.value).startswith(f"{second}: not a medpipe hand-over: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_loop_of_previous_links_is_refused(tmp_path: Path) -> None:
    from pipeline.handover import restore

    _, first, second = _chain(tmp_path)
    data = json.loads(first.read_text())
    data["previous"] = "../b/handover.json"
    first.write_text(json.dumps(data))
    with pytest.raises(NotAHandoverError, match="loops back"):
        restore(_fresh(), second)


def test_a_delta_on_other_base_checkpoints_is_refused(tmp_path: Path) -> None:
    from pipeline.handover import HandoverBaseError, restore

    _, first, second = _chain(tmp_path)
    other = {"llm": "/models/other-llm", "vision": "tiny:clip", "init": None, "sam": None}
    with pytest.raises(HandoverBaseError) as info:
        restore(_fresh(), second, base=other)
    assert str(info.value) == (
        f"{first}: trained on model.llm.path 'tiny:llama', but the config builds '/models/other-llm': "
        "a delta only applies to its own base checkpoints"
    )


def test_new_modules_no_delta_fills_are_an_error(tmp_path: Path) -> None:
    """A structure entry adds weights (a modality classifier): a hand-over must carry them."""
    from pipeline.handover import restore, save_handover
    from pipeline.structure import STRUCTURE_ATTR

    model = _fresh()
    object.__setattr__(model, STRUCTURE_ATTR, [{"kind": "modality_classifier", "modalities": ["CT", "MRI"]}])
    path = save_handover(model, tmp_path / "h.json", stage="s", changed=["connector.weight"])

    fresh = _fresh()  # what adding the classifier reads off the LLM
    fresh.llm.config = type("C", (), {"hidden_size": 2})()
    fresh.llm.get_input_embeddings = lambda: nn.Embedding(1, 2)
    with pytest.raises(ValueError, match=r"no hand-over of the chain holds \['modality_classifier.linear.bias'"):
        restore(fresh, path)


def test_every_build_draws_the_same_added_token_rows(cache_dir) -> None:
    """transformers samples the rows of added tokens (<image>, <SEG>, ...) around the mean embedding; a hand-over
    leaves them out unless a stage trains them, so every build must draw the same ones, whatever the RNG state."""
    from pipeline.config import load_config
    from pipeline.model_factory import build_model

    cfg = load_config(
        Path(__file__).parents[1] / "experiments" / "medplib" / "tiny.yaml",
        [f"cache_dir={cache_dir}", "model.grounding.sam_path=tiny:sam"],
        check_paths=False,
    )
    rows = []
    for seed in (1, 2):  # before the seeded draw, these two builds' added rows differed by up to 4.5e-6
        torch.manual_seed(seed)
        model = build_model(cfg.model, cache_dir=cfg.cache_dir).model
        rows.append((model.llm.get_input_embeddings().weight.detach(), model.llm.get_output_embeddings().weight))
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][1].detach(), rows[1][1].detach())
