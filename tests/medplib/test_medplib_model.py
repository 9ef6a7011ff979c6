"""The grounded model wired from the config: tokens, region splice, <SEG> selection, fallback, losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medplib_helpers import batch_of

from datamodules.regions import region_grid_weights
from lightningmodules.grounding_module import GroundingVLMModule, grounding_module_settings
from lightningmodules.losses import mask_losses
from lightningmodules.metrics.grounding_summary import grounding_summary, region_vqa_summary
from lightningmodules.metrics.segmentation import mask_iou
from lightningmodules.models.grounded import GROUNDING_TOKENS, GroundedMultimodalLM
from lightningmodules.models.multimodal import Decoding
from pipeline.plots import draw_overlay


def _module(cfg, built, stage: str = "grounding_expert") -> GroundingVLMModule:
    return GroundingVLMModule(
        model=built.model, tokenizer=built.tokenizer, **grounding_module_settings(cfg, cfg.stages[stage])
    )


def test_special_tokens_added_and_embeddings_resized(grounded) -> None:
    _, built, dm = grounded
    tokenizer, model = built.tokenizer, built.model
    assert isinstance(model, GroundedMultimodalLM)
    for token in GROUNDING_TOKENS:
        ids = tokenizer(f"a {token} b", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids, token  # one id, not split into pieces
    assert model.input_embeddings().num_embeddings == len(tokenizer)
    assert model.lm_head().weight.shape[0] == len(tokenizer)
    region = batch_of(dm, "train", lambda r: r.task == "region", n=1)
    ids = region["input_ids"][0].tolist()
    start = ids.index(tokenizer.convert_tokens_to_ids("<region>"))
    assert ids[start + 1 : start + 3] == [model.region_token_id, tokenizer.convert_tokens_to_ids("</region>")]
    grounding = batch_of(dm, "train", lambda r: r.task == "grounding", n=1)
    assert int((grounding["labels"][0] == model.seg_token_id).sum()) == 1  # <SEG> is a supervised target


def test_area_region_token_is_the_adapted_weighted_mean_of_patch_features(grounded, monkeypatch) -> None:
    """The "area" pooling option (the default "points": tests/medplib/test_region_points.py)."""
    _, built, dm = grounded
    model = built.model
    monkeypatch.setattr(model.region, "pooling", "area")
    batch = batch_of(dm, "train", lambda r: r.task == "region", n=2)
    with torch.no_grad():
        embeds = model.embed(
            batch["input_ids"],
            batch["pixel_values"],
            batch["image_task_ids"],
            region_weights=batch["region_weights"],
            region_batch_index=batch["region_batch_index"],
        )
        features = model.vision(batch["pixel_values"])  # (2, 64, D_vision)
    positions = (batch["input_ids"] == model.region_token_id).nonzero()  # (2, 2): one placeholder per sample
    assert positions[:, 0].tolist() == [0, 1]
    for b, t in positions.tolist():
        mask = batch["region_masks"][b].numpy()  # (128, 128) at the original resolution
        weights = region_grid_weights(mask, grid_size=8, image_transform=built.transform).flatten()  # (64,)
        # the 128 px image is resized to 64 px and cut into 8 px patches: a patch covers 16x16 original pixels
        block_mean = mask.reshape(8, 16, 8, 16).mean(axis=(1, 3)).flatten()  # (64,)
        np.testing.assert_allclose(weights.numpy(), block_mean, atol=0.08)
        pooled = (weights[:, None] * features[b]).sum(0) / weights.sum()  # (D_vision,)
        by_hand = pooled @ model.region.adapter.weight.T + model.region.adapter.bias  # (d_llm,)
        torch.testing.assert_close(embeds[b, t], by_hand, atol=1e-5, rtol=1e-4)


def test_collator_gives_the_tensors_the_model_used_to_compute(grounded) -> None:
    """Image-side preprocessing runs in the dataset / collator: the region weights are what the model's
    forward used to compute (``region_grid_weights`` per mask, sample by sample) and SAM's pixels are
    transformers' ``SamImageProcessor`` output."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from datamodules.images import load_image

    _, built, dm = grounded
    dataset = dm.dataset("train", with_answers=True)
    by_task = {task: [i for i, r in enumerate(dataset.records) if r.task == task] for task in ("region", "grounding")}
    items = [dataset[i] for i in (by_task["region"][0], by_task["grounding"][0], by_task["region"][1])]
    batch = dm.collator()(items)
    expected, samples = [], []
    for b, mask in enumerate(batch["region_masks"]):
        if mask is not None:
            grid = built.model.region.grid_size
            expected.append(region_grid_weights(mask.cpu(), grid_size=grid, image_transform=built.transform))
            samples.append(b)
    assert samples == [0, 2]
    assert torch.equal(batch["region_weights"], torch.stack(expected))  # (2, G, G)
    assert batch["region_batch_index"].tolist() == samples
    size = built.model.grounding.image_size
    processor = SamImageProcessorPil(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    assert batch["sam_pixel_values"].shape == (3, 3, size, size)
    for b, record in enumerate(batch["records"]):
        image = np.asarray(load_image(record.image_path, record.image_bytes, record=record.id))  # (H, W, 3)
        reference = processor(images=image, return_tensors="pt")
        torch.testing.assert_close(batch["sam_pixel_values"][b], reference["pixel_values"][0], atol=1e-5, rtol=0)
        assert list(batch["sam_resized_sizes"][b]) == [int(v) for v in reference["reshaped_input_sizes"][0]]
        assert tuple(batch["image_sizes"][b]) == image.shape[:2]


def test_region_weights_must_match_the_placeholders(grounded) -> None:
    _, built, dm = grounded
    model = built.model
    batch = batch_of(dm, "train", lambda r: r.task == "region", n=2)
    inputs = (batch["input_ids"], batch["pixel_values"], batch["image_task_ids"])
    with torch.no_grad(), pytest.raises(ValueError, match="sample 1: 1 <region> prompt"):
        model.embed(
            *inputs,
            region_masks_input=batch["region_masks_input"][:1],
            region_batch_index=batch["region_batch_index"][:1],
        )
    with torch.no_grad(), pytest.raises(ValueError, match="sample 0: 1 <region> prompt.*'region_masks_input'"):
        model.embed(*inputs, region_weights=batch["region_weights"], region_batch_index=batch["region_batch_index"])
    with torch.no_grad(), pytest.raises(ValueError, match="sample 0: 1 <region> prompt"):
        model.embed(*inputs)
    # a region whose placeholder was truncated away is dropped, as before
    model.eval()  # the "points" subset of a large region: a fixed seed in evaluation (random while training)
    truncated = batch["input_ids"].clone()
    truncated[1][truncated[1] == model.region_token_id] = built.tokenizer.pad_token_id
    with torch.no_grad():
        embeds = model.embed(
            truncated,
            *inputs[1:],
            region_masks_input=batch["region_masks_input"],
            region_batch_index=batch["region_batch_index"],
        )
        alone = model.embed(
            truncated[:1],
            batch["pixel_values"][:1],
            batch["image_task_ids"][:1],
            region_masks_input=batch["region_masks_input"][:1],
            region_batch_index=batch["region_batch_index"][:1],
        )
    torch.testing.assert_close(embeds[0], alone[0])


def test_seg_selection_in_generation_and_no_seg_fallback(grounded, monkeypatch) -> None:
    _, built, dm = grounded
    model, tokenizer = built.model, built.tokenizer
    model.eval()
    batch = batch_of(dm, "test", lambda r: r.task == "grounding", n=2, generation=True)
    word = tokenizer("it", add_special_tokens=False)["input_ids"][0]
    eos, pad, seg = tokenizer.eos_token_id, tokenizer.pad_token_id, model.seg_token_id
    generated = torch.tensor([[word, seg, word, eos], [word, word, eos, pad]])  # sample 1 has no <SEG>
    # as HF's generate: prompt ids + new tokens when it is given the prompt's ids, else the new tokens
    monkeypatch.setattr(
        model.llm,
        "generate",
        lambda input_ids=None, **_: generated if input_ids is None else torch.cat([input_ids, generated], 1),
    )
    seen = {}
    original = model.grounding.predict

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model.grounding, "predict", spy)
    model.grounding.no_seg_count = 0
    ids, masks = model.generate_with_masks(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_task_ids"],
        sam_pixel_values=batch["sam_pixel_values"],
        image_sizes=batch["image_sizes"],
        sam_resized_sizes=batch["sam_resized_sizes"],
        max_new_tokens=4,
        eos_token_id=eos,
        no_seg="none",
    )
    assert masks[1] is None and model.grounding.no_seg_count == 1  # fallback, counted
    assert masks[0].shape == tuple(batch["image_sizes"][0])  # (H, W) original resolution
    assert seen["batch_index"].tolist() == [0]
    # the hidden state that produced <SEG>: teacher forcing over sample 0's prompt + "it" (no padding)
    real = batch["attention_mask"][0].bool()
    prompt = batch["input_ids"][0][real]
    sequence = torch.cat([prompt, torch.tensor([word, seg])])[None]  # (1, T0 + 2)
    with torch.no_grad():
        out = model(sequence, torch.ones_like(sequence), pixel_values=batch["pixel_values"][:1])
    expected = out.hidden_states[0, len(prompt)]  # position of "it", whose next token is <SEG>
    torch.testing.assert_close(seen["seg_embeddings"][0], expected, atol=1e-4, rtol=1e-4)

    # the released evaluate (MedPLIB 5ab54bc MedPLIB.py:642-644) for an answer without <SEG>: generate()'s
    # per-step last hidden states concatenated (the prompt's, then one per new token but the last: teacher
    # forcing over prompt + answer[:-1]), entry -2
    model.grounding.no_seg_count = 0
    _, masks = model.generate_with_masks(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["image_task_ids"],
        sam_pixel_values=batch["sam_pixel_values"],
        image_sizes=batch["image_sizes"],
        sam_resized_sizes=batch["sam_resized_sizes"],
        max_new_tokens=4,
        eos_token_id=eos,
    )
    assert masks[1] is not None and masks[1].shape == tuple(batch["image_sizes"][1])
    assert model.grounding.no_seg_count == 1 and seen["batch_index"].tolist() == [0, 1]
    real = batch["attention_mask"][1].bool()
    answer = [word, word, eos]  # sample 1's answer up to its stop token
    concatenated = torch.cat([batch["input_ids"][1][real], torch.tensor(answer[:-1])])[None]  # (1, T1 + L - 1)
    with torch.no_grad():
        out = model(concatenated, torch.ones_like(concatenated), pixel_values=batch["pixel_values"][1:2])
    torch.testing.assert_close(seen["seg_embeddings"][1], out.hidden_states[0, -2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("no_seg_mask", ["none", "last_answer_token"])
def test_test_step_scores_masks_and_counts_the_fallback(grounded, monkeypatch, tmp_path, no_seg_mask) -> None:
    cfg, built, dm = grounded
    settings = {**grounding_module_settings(cfg, cfg.stages["grounding_expert"]), "no_seg_mask": no_seg_mask}
    module = GroundingVLMModule(model=built.model, tokenizer=built.tokenizer, **settings)
    batch = batch_of(dm, "test", lambda r: r.task == "grounding", n=3, generation=True)
    eos = built.tokenizer.eos_token_id
    monkeypatch.setattr(built.model.llm, "generate", lambda **_: torch.full((3, 2), eos))  # never <SEG>
    module.on_test_epoch_start()
    module.test_step(batch, 0)
    rows = module.predictions
    assert [r["seg_produced"] for r in rows] == [False] * 3 and module.no_seg_count == 3
    assert all(r["no_seg_mask"] == no_seg_mask for r in rows)  # each row says how its mask was made
    summary = grounding_summary(rows)
    assert summary["seg/no_mask"] == 3 and summary["seg/count"] == 3
    if no_seg_mask == "none":  # no mask: IoU 0 (MedPLIB's first release)
        assert all(r["iou"] == 0.0 and r["dice"] == 0.0 for r in rows) and summary["seg/mdice"] == 0.0
        assert all(s.pred is None for s in module.overlay_samples)
    else:  # a mask decoded from the answer's last hidden state, scored like any other
        assert all(s.pred is not None and s.pred.shape == s.target.shape for s in module.overlay_samples)
        assert all(r["iou"] == mask_iou(s.pred, s.target) for r, s in zip(rows, module.overlay_samples, strict=True))
    assert len(module.overlay_samples) == 3
    drawn = [draw_overlay(s.record, s.pred, s.target, tmp_path / "overlays") for s in module.overlay_samples]
    assert all(p.suffix == ".png" and p.is_file() for p in drawn)


def test_grounding_summary_by_hand() -> None:
    rows = [
        {"iou": 0.5, "pixel_dice": 0.7, "seg_produced": True, "modality": "CT"},
        {"iou": 0.0, "pixel_dice": None, "seg_produced": False, "modality": "MRI"},
        {"iou": 1.0, "pixel_dice": 1.0, "seg_produced": True, "modality": "CT"},
        {"text": "no mask row"},
    ]
    out = grounding_summary(rows)
    assert out["seg/miou"] == pytest.approx(0.5)
    assert out["seg/mdice"] == pytest.approx((2 * 0.5 / 1.5 + 0.0 + 1.0) / 3)
    assert out["seg/mdice/CT"] == pytest.approx((2 * 0.5 / 1.5 + 1.0) / 2) and out["seg/count/MRI"] == 1
    assert out["seg/monai_dice"] == pytest.approx(0.85) and out["seg/no_mask"] == 1


def test_region_vqa_summary_uses_medplibs_exact_match() -> None:
    rows = [
        {"task": "region", "text": "Liver.", "answer": "liver", "answer_type": "open"},
        {"task": "region", "text": "Yes, there is", "answer": "Yes", "answer_type": "closed"},
        {"task": "region", "text": "no", "answer": "No", "answer_type": "closed"},
        {"task": "vqa", "text": "x", "answer": "y", "answer_type": "closed"},
    ]
    out = region_vqa_summary(rows)
    assert out["region/closed_count"] == 2 and out["region/open_count"] == 1
    assert out["region/closed_accuracy"] == 0.5  # "yes, there is" != "yes": exact match, not substring
    assert out["region/open_recall"] == 1.0
    assert region_vqa_summary(rows[3:]) == {}


def test_overlay_colours(tmp_path) -> None:
    from PIL import Image

    from datamodules.records import Record

    image = tmp_path / "img.png"
    Image.fromarray(np.full((4, 6), 100, np.uint8)).save(image)
    record = Record(
        id="a/b", dataset="d", split="test", question="q", answer="a", answer_type="open", image_path=str(image)
    )
    target = torch.zeros(4, 6, dtype=torch.bool)
    target[0, :3] = True
    pred = torch.zeros(4, 6, dtype=torch.bool)
    pred[0, 2:5] = True
    pixels = np.asarray(Image.open(draw_overlay(record, pred, target, tmp_path / "o")))  # (4, 6, 3)
    assert pixels[0, 0].tolist() == [60, 255, 60]  # target only: green
    assert pixels[0, 2].tolist() == [255, 255, 60]  # both: yellow
    assert pixels[0, 4].tolist() == [255, 60, 60]  # prediction only: red
    assert pixels[3, 5].tolist() == [60, 60, 60]  # neither: grey


def test_loss_is_the_weighted_sum_on_a_mixed_batch(grounded) -> None:
    cfg, built, dm = grounded
    module = _module(cfg, built)
    hp = module.hparams
    assert (hp.ce_weight, hp.bce_weight, hp.dice_weight, hp.focal_weight) == (1.0, 1.0, 5.0, 1.0)  # stage III
    region = batch_of(dm, "train", lambda r: r.task == "region", n=2)
    dataset = dm.dataset("train", with_answers=True)
    pick = [i for i, r in enumerate(dataset.records) if r.task == "grounding"][:3] + [
        i for i, r in enumerate(dataset.records) if r.task == "region"
    ][:3]
    items = [dataset[i] for i in sorted(pick, key=lambda i: i % 5)]  # interleaved
    batch = dm.collator()(items)
    n_masks = sum(m is not None for m in batch["masks"])
    assert 0 < n_masks < len(items)  # samples with and without masks
    torch.manual_seed(0)
    built.model.eval()  # no dropout: the two forwards below are the same computation
    terms = module.losses(batch)
    out = built.model(
        **{
            k: batch[k]
            for k in (
                "input_ids",
                "attention_mask",
                "labels",
                "pixel_values",
                "image_task_ids",
                "region_masks_input",
                "region_weights",
                "region_batch_index",
            )
        }
    )
    masks, index = built.model.segment(
        out.hidden_states,
        batch["input_ids"],
        sam_pixel_values=batch["sam_pixel_values"],
        image_sizes=batch["image_sizes"],
        sam_resized_sizes=batch["sam_resized_sizes"],
    )
    assert len(masks) == n_masks == int(terms["masks"])
    targets = [batch["masks"][b] for b in index.tolist()]
    parts = mask_losses(masks, targets, bce_weight=1.0, dice_weight=1.0, focal_weight=1.0)
    expected = 1.0 * out.loss + 1.0 * parts["bce"] + 5.0 * parts["dice"] + 1.0 * parts["focal"]
    torch.testing.assert_close(terms["loss"], expected, atol=1e-5, rtol=1e-5)
    without = module.losses(region)  # no mask at all: CE only, exactly
    assert int(without["masks"]) == 0
    torch.testing.assert_close(without["loss"], without["ce"], atol=1e-6, rtol=0)


def test_stage_loss_weights_from_the_recipe(grounded) -> None:
    cfg, _, _ = grounded
    iii = grounding_module_settings(cfg, cfg.stages["grounding_expert"])
    iv = grounding_module_settings(cfg, cfg.stages["moe"])
    assert (iii["ce_weight"], iii["bce_weight"], iii["dice_weight"]) == (1.0, 1.0, 5.0)
    assert (iv["ce_weight"], iv["bce_weight"], iv["dice_weight"]) == (1.0, 2.0, 0.5)
    assert iii["mask_threshold"] == 0.1


def test_grounded_generation_applies_the_configured_decoding_settings(grounded) -> None:
    """``evaluation.repetition_penalty`` reaches the grounded model's decoding: its answers equal the plain
    model's ``generate`` under the same setting, and differ from greedy."""
    _, built, dm = grounded
    model = built.model.eval()
    batch = batch_of(dm, "test", lambda r: r.task == "grounding", n=2, generation=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_task_ids")}
    grounding = {k: batch[k] for k in ("sam_pixel_values", "image_sizes", "sam_resized_sizes")}
    with torch.no_grad():  # strong logits, so a penalty changes greedy picks
        model.lm_head().weight.mul_(8.0)
    settings = {"max_new_tokens": 8, "pad_token_id": built.tokenizer.pad_token_id}
    penalised = Decoding(repetition_penalty=5.0)
    ids, _ = model.generate_with_masks(**inputs, **grounding, **settings, decoding=penalised)
    reference = model.generate(**inputs, **settings, decoding=penalised)
    greedy, _ = model.generate_with_masks(**inputs, **grounding, **settings)
    assert ids.tolist() == reference.tolist()
    assert ids.tolist() != greedy.tolist()
