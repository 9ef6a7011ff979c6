"""Model parts: save/load round trips, the factory, MultimodalLM's loss, aggregation, trainable
groups, LoRA merge and the stage hand-over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lightningmodules.models.aggregation import TokenAggregation
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "experiments" / "demo.yaml"


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from lightningmodules.models.language import load_tokenizer

    return load_tokenizer(tiny_llama, extra_special_tokens=["<image>"])


def build(cache_dir: Path, *overrides: str):
    from pipeline.model_factory import build_model

    torch.manual_seed(0)  # the connector is freshly initialised
    # the plain LLaVA layout (no token pooling) unless a test overrides it
    cfg = load_config(DEMO, ["model.connector.aggregation=none", *overrides])
    built = build_model(cfg.model, cache_dir=cache_dir)
    built.model.eval()
    return built


@pytest.fixture
def built(cache_dir, tiny_llama, tiny_clip):
    return build(cache_dir)


def make_batch(model, tok, *, lengths=(12, 9), images=(True, False), seed=0):
    """Right-padded batch: BOS, then (num_image_tokens image ids if the sample has an image), then
    random text; labels supervise the last 3 real tokens of every sample."""
    g = torch.Generator().manual_seed(seed)
    n_img = model.num_image_tokens
    rows, labels = [], []
    for length, has_image in zip(lengths, images, strict=True):
        text = torch.randint(5, len(tok) - 1, (length,), generator=g).tolist()
        ids = [tok.bos_token_id] + ([model.image_token_id] * n_img if has_image else []) + text
        lab = [-100] * (len(ids) - 3) + ids[-3:]
        rows.append(ids)
        labels.append(lab)
    longest = max(map(len, rows))
    input_ids = torch.full((len(rows), longest), tok.pad_token_id)
    label_t = torch.full((len(rows), longest), -100)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    size = model.vision.image_size
    pixel_values = torch.randn(sum(images), 3, size, size, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": label_t,
        "pixel_values": pixel_values if sum(images) else None,
    }


# -- save / load round trips --------------------------------------------------------------------------


def test_causal_lm_round_trip(tiny_llama, tok, tmp_path: Path) -> None:
    from lightningmodules.models.language import load_causal_lm

    lm = load_causal_lm(tiny_llama, vocab_size=len(tok)).eval()
    assert lm.get_input_embeddings().num_embeddings >= len(tok)
    lm.save_pretrained(tmp_path / "lm")
    again = load_causal_lm(tmp_path / "lm", vocab_size=len(tok)).eval()
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, again(input_ids=ids).logits
    assert a.shape == (2, 10, lm.config.vocab_size)
    assert torch.equal(a, b)
    sd_a, sd_b = lm.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_causal_lm_resize_to_larger_vocab(tiny_llama, tok, tmp_path: Path) -> None:
    from lightningmodules.models.language import load_causal_lm

    base = load_causal_lm(tiny_llama, vocab_size=len(tok)).eval()
    n_old = base.get_input_embeddings().num_embeddings
    grown = load_causal_lm(tiny_llama, vocab_size=n_old + 3).eval()
    emb = grown.get_input_embeddings().weight
    assert emb.shape[0] == n_old + 3
    assert grown.get_output_embeddings().weight.shape[0] == n_old + 3
    assert torch.equal(emb[:n_old], base.get_input_embeddings().weight)
    old_mean = base.get_input_embeddings().weight.mean(0)
    assert torch.allclose(emb[n_old:], old_mean.expand(3, -1), atol=1e-3)  # new rows at the mean
    grown.save_pretrained(tmp_path / "grown")
    again = load_causal_lm(tmp_path / "grown", vocab_size=n_old + 3).eval()
    ids = torch.tensor([[0, 5, n_old + 1, n_old + 2, 7]])
    with torch.no_grad():
        assert torch.equal(grown(input_ids=ids).logits, again(input_ids=ids).logits)


def test_vision_model_round_trip(tiny_clip, tmp_path: Path) -> None:
    from lightningmodules.models.vision import VisionTower, load_vision_model

    enc = load_vision_model(tiny_clip).eval()
    assert type(enc).__name__ == "CLIPVisionModel"
    enc.save_pretrained(tmp_path / "clip")
    again = load_vision_model(tmp_path / "clip").eval()
    px = torch.randn(2, 3, enc.config.image_size, enc.config.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = enc(pixel_values=px, output_hidden_states=True).hidden_states
        b = again(pixel_values=px, output_hidden_states=True).hidden_states
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    tower = VisionTower(encoder=enc, select_layer=-2)
    with torch.no_grad():
        feats = tower(px)
    grid = enc.config.image_size // enc.config.patch_size
    assert feats.shape == (2, grid * grid, enc.config.hidden_size)
    assert torch.equal(feats, a[-2][:, 1:])  # layer -2, CLS dropped
    with torch.no_grad():
        cls_patch = VisionTower(encoder=enc, select_layer=-2, select_feature="cls_patch")(px)
    assert torch.equal(cls_patch, a[-2])


# -- factory --------------------------------------------------------------------------------------------


def test_build_model_num_image_tokens(built) -> None:
    model = built.model
    vision = model.vision
    assert vision.grid_size == vision.image_size // vision.patch_size
    assert model.num_image_tokens == vision.grid_size**2 == vision.num_patches
    assert model.image_token_id == built.tokenizer.convert_tokens_to_ids("<image>")
    assert model.llm.get_input_embeddings().num_embeddings >= len(built.tokenizer)
    px = torch.randn(2, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        visual = model.encode_images(px)
    assert visual.shape == (2, model.num_image_tokens, model.llm.config.hidden_size)
    assert built.transform.output_size == (vision.image_size, vision.image_size)
    # the vision tower is frozen, the connector learns by default
    assert not any(p.requires_grad for p in vision.parameters())


@pytest.mark.parametrize("mode, width_factor", [("avgpool", 1), ("maxpool", 1), ("concat4", 4)])
def test_build_model_aggregation(cache_dir, tiny_llama, tiny_clip, mode, width_factor) -> None:
    plain = build(cache_dir).model
    model = build(cache_dir, f"model.connector.aggregation={mode}").model
    assert model.num_image_tokens == plain.num_image_tokens // 4
    first = model.connector.fc1
    assert first.in_features == plain.vision.hidden_size * width_factor
    px = torch.randn(1, 3, model.vision.image_size, model.vision.image_size)
    with torch.no_grad():
        assert model.encode_images(px).shape == (1, model.num_image_tokens, model.llm.config.hidden_size)


def test_build_model_linear_connector(cache_dir, tiny_llama, tiny_clip) -> None:
    from lightningmodules.models.connector import LinearConnector

    model = build(cache_dir, "model.connector.type=linear").model
    assert isinstance(model.connector, LinearConnector)
    assert model.connector.proj.in_features == model.vision.hidden_size


# -- MultimodalLM ----------------------------------------------------------------------------------------


def manual_loss(model, batch) -> torch.Tensor:
    """Cross-entropy from the LLM's full logits over the same inputs_embeds: shift, ignore -100."""
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shifted.float(), targets, ignore_index=-100)


def test_forward_loss_equals_manual_cross_entropy(built) -> None:
    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(12, 9, 5), images=(True, False, True))
    with torch.no_grad():
        out = model(**batch)
        expected = manual_loss(model, batch)
    assert out.token_count == 9  # 3 supervised tokens per sample
    assert out.hidden_states.shape == (*batch["input_ids"].shape, model.llm.config.hidden_size)
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss) - float(expected)) < 1e-5


def test_forward_loss_depends_on_the_image(built) -> None:
    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(8,), images=(True,))
    with torch.no_grad():
        a = model(**batch).loss
        batch["pixel_values"] = batch["pixel_values"] * -1.0
        b = model(**batch).loss
    assert not torch.allclose(a, b)  # visual tokens really reach the LM


def test_forward_without_labels_and_without_targets(built) -> None:
    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(6, 4), images=(False, False))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out.loss is None and out.token_count == 0
        out = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)})
    assert out.token_count == 0 and float(out.loss) == 0.0


def test_visual_tokens_are_spliced_in_order(built) -> None:
    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(4, 3), images=(True, True))
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        visual = model.encode_images(batch["pixel_values"])  # (2, I, D)
        text = model.input_embeddings()(batch["input_ids"])
    n = model.num_image_tokens
    for i in range(2):
        assert torch.equal(embeds[i, 1 : 1 + n], visual[i])  # sample i gets image i
        assert torch.equal(embeds[i, 0], text[i, 0]) and torch.equal(embeds[i, 1 + n :], text[i, 1 + n :])


def test_image_token_mismatch_raises(built) -> None:
    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(5, 5), images=(True, True))
    with pytest.raises(ValueError, match="image-token positions"):
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})  # 2 placeholders, 1 image
    with pytest.raises(ValueError, match="image-token positions"):
        model(**{**batch, "pixel_values": None})
    text_only = make_batch(model, tok, lengths=(5,), images=(False,))
    with pytest.raises(ValueError, match="image-token positions"):
        model(**{**text_only, "pixel_values": torch.zeros(1, 3, model.vision.image_size, model.vision.image_size)})


# -- TokenAggregation ------------------------------------------------------------------------------


def grid_tokens() -> torch.Tensor:
    """(1, 16, 2): a 4 x 4 patch grid in raster order; channel 0 = index, channel 1 = -index."""
    idx = torch.arange(16, dtype=torch.float32)
    return torch.stack([idx, -idx], dim=-1).unsqueeze(0)


def test_aggregation_avgpool() -> None:
    # grid   0  1  2  3     2x2 windows: {0,1,4,5} -> 2.5   {2,3,6,7} -> 4.5
    #        4  5  6  7                  {8,9,12,13} -> 10.5 {10,11,14,15} -> 12.5
    #        8  9 10 11
    #       12 13 14 15
    out = TokenAggregation(mode="avgpool")(grid_tokens())
    assert out.shape == (1, 4, 2)
    assert out[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert out[0, :, 1].tolist() == [-2.5, -4.5, -10.5, -12.5]


def test_aggregation_maxpool() -> None:
    # max of each 2x2 window: 5, 7, 13, 15; of the negated channel: -0, -2, -8, -10
    out = TokenAggregation(mode="maxpool")(grid_tokens())
    assert out[0, :, 0].tolist() == [5.0, 7.0, 13.0, 15.0]
    assert out[0, :, 1].tolist() == [0.0, -2.0, -8.0, -10.0]


def test_aggregation_pool_4() -> None:
    out = TokenAggregation(mode="avgpool", pool=4)(grid_tokens())
    assert out.shape == (1, 1, 2) and out[0, 0].tolist() == [7.5, -7.5]  # mean of 0..15


def test_aggregation_concat4() -> None:
    # 4 consecutive raster tokens side by side: token k -> [t4k, t4k+1, t4k+2, t4k+3] (each (x, -x))
    out = TokenAggregation(mode="concat4")(grid_tokens())
    assert out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [0, -0, 1, -1, 2, -2, 3, -3]
    assert out[0, 3].tolist() == [12, -12, 13, -13, 14, -14, 15, -15]


def test_aggregation_batch_independent() -> None:
    x = torch.randn(3, 16, 5)
    agg = TokenAggregation(mode="avgpool")
    out = agg(x)
    for i in range(3):
        assert torch.allclose(out[i : i + 1], agg(x[i : i + 1]))
    # first pooled token of sample 1 by hand: mean of tokens 0, 1, 4, 5
    assert torch.allclose(out[1, 0], x[1, [0, 1, 4, 5]].mean(0), atol=1e-6)


def test_aggregation_none_and_shapes() -> None:
    x = torch.randn(2, 16, 3)
    assert TokenAggregation(mode="none")(x) is x
    assert TokenAggregation(mode="none").output_shape(16, 3) == (16, 3)
    assert TokenAggregation(mode="concat4").output_shape(64, 3) == (16, 12)
    assert TokenAggregation(mode="avgpool").output_shape(64, 3) == (16, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        TokenAggregation(mode="concat4").output_shape(6, 3)
    with pytest.raises(ValueError, match="square grid"):
        TokenAggregation(mode="avgpool").output_shape(12, 3)
    with pytest.raises(ValueError, match="square grid"):
        TokenAggregation(mode="maxpool", pool=2).output_shape(9, 3)  # 3 x 3 not divisible by 2
    with pytest.raises(ValueError, match="aggregation"):
        TokenAggregation(mode="sum")


# -- trainable groups and LoRA ---------------------------------------------------------------------

LORA = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]})


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_trainable_connector_only(built) -> None:
    from pipeline.trainable import set_trainable

    model = built.model
    counts = set_trainable(model, ["connector"])
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("connector.")}
    assert names  # not empty
    assert counts == {"connector": sum(p.numel() for p in model.connector.parameters())}
    assert model.vision.frozen


def test_set_trainable_llm_and_vision(built) -> None:
    from pipeline.trainable import set_trainable

    model = built.model
    counts = set_trainable(model, ["llm", "vision"])
    names = trainable_names(model)
    assert names == {n for n, _ in model.named_parameters() if n.startswith(("llm.", "vision."))}
    assert counts["llm"] == sum(p.numel() for p in model.llm.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.vision.parameters())
    assert not model.vision.frozen
    with pytest.raises(ValueError, match="decoder"):
        set_trainable(model, ["decoder"])


def test_set_trainable_with_lora(built) -> None:
    from pipeline.trainable import add_lora, set_trainable

    model = built.model
    add_lora(model, LORA)
    counts = set_trainable(model, ["connector", "lora"])
    names = trainable_names(model)
    lora = {n for n in names if "lora_" in n}
    assert lora and all(n.startswith("llm.") for n in lora)
    assert names == lora | {n for n, _ in model.named_parameters() if n.startswith("connector.")}
    # every Linear of the LLM but lm_head carries an adapter (q, k, v, o, gate, up, down)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in lora)
    assert counts["lora"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # gradients reach exactly those parameters
    batch = make_batch(model, built.tokenizer, lengths=(6,), images=(True,))
    model.train()
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == names


def test_merge_lora_gives_plain_model_with_same_outputs(built) -> None:
    from peft import PeftModel

    from pipeline.trainable import add_lora, merge_lora

    model, tok = built.model, built.tokenizer
    batch = make_batch(model, tok, lengths=(10, 7), images=(True, False))
    with torch.no_grad():
        before = model(**batch)
    add_lora(model, LORA)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    with torch.no_grad():
        lora_out = model(**batch)
    # the adapters really change the outputs, so the merge comparison below can fail
    assert not torch.allclose(lora_out.hidden_states, before.hidden_states, atol=1e-3)
    merge_lora(model)
    assert not isinstance(model.llm, PeftModel)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        merged_out = model(**batch)
    assert torch.allclose(merged_out.hidden_states, lora_out.hidden_states, atol=1e-5)
    assert abs(float(merged_out.loss) - float(lora_out.loss)) < 1e-5
    merge_lora(model)  # a no-op on a plain model


def test_merged_model_has_the_plain_state_dict_keys(cache_dir, built) -> None:
    from pipeline.trainable import add_lora, merge_lora

    plain_keys = set(build(cache_dir).model.state_dict())
    add_lora(built.model, LORA)
    merge_lora(built.model)
    assert set(built.model.state_dict()) == plain_keys


# -- hand-over --------------------------------------------------------------------------------------


def test_handover_round_trip(cache_dir, built, tmp_path: Path) -> None:
    from pipeline.handover import load_handover, restore, save_handover

    with torch.no_grad():
        for p in built.model.connector.parameters():
            p.add_(1.0)  # differs from a freshly built model's connector
    path = save_handover(built.model, tmp_path / "stages" / "align" / "handover.json", stage="align", meta={"step": 7})
    # the manifest and its delta, no temporary file left
    assert sorted(p.name for p in path.parent.iterdir()) == ["handover.json", "handover.safetensors"]
    fresh = build(cache_dir).model
    assert not torch.equal(fresh.connector.fc1.weight, built.model.connector.fc1.weight)
    data = restore(fresh, path)
    assert data["stage"] == "align" and data["meta"] == {"step": 7, "structure": []}  # plain model: no MoE
    a, b = built.model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(path.read_text())["version"] == 2 and load_handover(path)["stage"] == "align"


def test_a_format_1_handover_still_restores(cache_dir, built, tmp_path: Path) -> None:
    """Runs written before hand-overs became deltas: one torch.save file of the whole state dict."""
    from pipeline.handover import restore

    with torch.no_grad():
        built.model.connector.fc1.weight.add_(1.0)
    state = {k: v.clone() for k, v in built.model.state_dict().items()}
    torch.save({"format": 1, "stage": "old", "meta": {"structure": []}, "state_dict": state}, tmp_path / "handover.pt")
    fresh = build(cache_dir).model
    assert restore(fresh, tmp_path / "handover.pt")["stage"] == "old"
    assert torch.equal(fresh.connector.fc1.weight, built.model.connector.fc1.weight)


def test_handover_restore_into_mismatched_model(cache_dir, built, tmp_path: Path) -> None:
    from pipeline.handover import restore, save_handover
    from pipeline.trainable import add_lora

    path = save_handover(built.model, tmp_path / "h.json", stage="s")
    linear = build(cache_dir, "model.connector.type=linear").model  # proj.* instead of fc1/fc2
    with pytest.raises(ValueError) as info:
        restore(linear, path)
    msg = str(info.value)
    assert str(path) in msg and "connector.proj.weight" in msg and "connector.fc1.weight" in msg
    with_lora = build(cache_dir).model
    add_lora(with_lora, LORA)
    with pytest.raises(ValueError, match="lora_A"):
        restore(with_lora, path)


def test_handover_unexpected_key_is_named(cache_dir, built, tmp_path: Path) -> None:
    from pipeline.handover import restore, save_handover

    path = save_handover(built.model, tmp_path / "h.json", stage="s")
    state = {k: v.clone() for k, v in built.model.state_dict().items()}
    rewrite_delta(path, {**state, "grounding.head.weight": torch.zeros(2)})  # a hand-over of another model
    with pytest.raises(ValueError, match=r"unexpected \['grounding.head.weight'\]"):
        restore(build(cache_dir).model, path)
    del state["connector.fc2.bias"]
    rewrite_delta(path, state)  # complete (every weight) but one
    with pytest.raises(ValueError, match=r"missing \['connector.fc2.bias'\]"):
        restore(build(cache_dir).model, path)


def rewrite_delta(manifest: Path, tensors: dict) -> None:
    """Replace a hand-over's delta, its manifest's hash updated (so only the content is wrong)."""
    from safetensors.torch import save_file

    from pipeline.fingerprints import file_sha256

    data = json.loads(manifest.read_text())
    file = manifest.parent / data["delta"][0]["file"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    data["delta"][0]["sha256"] = file_sha256(file)
    manifest.write_text(json.dumps(data))


def test_handover_bad_files(tmp_path: Path) -> None:
    from pipeline.handover import load_handover

    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_handover(tmp_path / "absent.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a medpipe hand-over"):
        load_handover(tmp_path / "other.pt")


def test_handover_shape_mismatch_is_an_error(cache_dir, built, tmp_path: Path) -> None:
    from pipeline.handover import restore, save_handover

    path = save_handover(built.model, tmp_path / "h.json", stage="s")
    pooled = build(cache_dir, "model.connector.aggregation=concat4").model  # fc1 is 4x wider
    with pytest.raises((ValueError, RuntimeError), match="connector.fc1.weight"):
        restore(pooled, path)


def test_handover_shape_mismatch_names_file_and_key(cache_dir, built, tmp_path: Path) -> None:
    from pipeline.handover import restore, save_handover

    path = save_handover(built.model, tmp_path / "h.json", stage="s")
    pooled = build(cache_dir, "model.connector.aggregation=concat4").model
    with pytest.raises(ValueError) as info:
        restore(pooled, path)
    first_line = str(info.value).splitlines()[0]
    assert str(path) in first_line and "connector.fc1.weight" in first_line
