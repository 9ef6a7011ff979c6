"""Map-style dataset over records and the collator that pads them into batches."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.encoding import IGNORE_INDEX, ConversationEncoder, pad_batch
from datamodules.images import ImageTransform, SamImageTransform, load_image, load_mask
from datamodules.problems import DataError
from datamodules.prompts import PromptTemplates
from datamodules.records import Record
from datamodules.regions import region_inputs
from datamodules.verify import pixel_limit

LOAD_HINT = (
    "found while loading a sample; run `medpipe data check --format FORMAT PATH` (or set "
    "data.verify_images=true) to find every such file before training"
)


class VQADataset(Dataset):
    """Decodes the image and tokenises one record per item (so both run in loader workers).

    A record with a grounding target (``mask_path``) or a region prompt (``region``) also yields
    that mask at the image's original resolution (scoring happens there) and the original image
    size. Grounded models also get the image-side inputs of their extra parts, computed here in the
    loader workers: SAM's copy of the image (``sam_transform``) and, with ``region_grid_size`` G, the
    region mask carried through the vision transform (:func:`datamodules.regions.region_inputs`): at the
    vision input resolution (``region_mask_input`` (H_in, W_in) bool, what the region encoder samples) and
    area-pooled onto the G x G patch grid (``region_weights`` (G, G), the "area" pooling option).

    An image or mask that fails to decode raises :class:`DataError` naming the file and record,
    under either bad-record policy: a worker cannot drop a sample without changing the epoch behind
    the sampler's back. ``medpipe data check`` / ``data.verify_images`` find such files up front,
    where ``skip`` applies.
    """

    def __init__(
        self,
        records: list[Record],
        *,
        encoder: ConversationEncoder,
        transform: ImageTransform,
        with_answers: bool,
        task_ids: dict[str, int] | None = None,
        prompts: PromptTemplates | None = None,
        random_prompts: bool = False,
        sam_transform: SamImageTransform | None = None,
        region_grid_size: int | None = None,
        max_image_pixels: Mapping[str, int] | None = None,
    ) -> None:
        self.records = records
        self.encoder = encoder
        self.transform = transform
        self.with_answers = with_answers
        self.task_ids = task_ids or {}
        # per-task prompt templates: a random one per item in training, the first at evaluation
        self.prompts = prompts
        self.random_prompts = random_prompts
        self.sam_transform = sam_transform  # MedPLIB grounding: SAM's own copy of each image
        self.region_grid_size = region_grid_size  # MedPLIB region prompts: the vision tower's patch grid
        self.max_image_pixels = max_image_pixels  # dataset name -> its pixel limit (decompression bombs)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        prompted = record
        if self.prompts is not None:
            # the draw depends only on (epoch, index): the same in every worker layout and after a resume
            rng = random.Random(f"{getattr(index, 'epoch', 0)}:{int(index)}") if self.random_prompts else None
            prompted = self.prompts.apply(record, rng)
        encoded = self.encoder.encode(prompted, with_answers=self.with_answers)
        item = {
            "record": record,
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "truncated": encoded.truncated,
            "pixel_values": None,
            "task_id": self.task_ids.get(record.task, 0),
        }
        if not record.has_image:
            return item
        limit = pixel_limit(record, self.max_image_pixels)
        try:
            image = load_image(record.image_path, record.image_bytes, record=record.id, max_pixels=limit)
            item["pixel_values"] = self.transform(image)  # (3, H, W)
            if self.sam_transform is not None:
                item["sam_pixel_values"], item["sam_resized_size"], _ = self.sam_transform(image)  # (3, S, S)
                item["image_size"] = (image.size[1], image.size[0])  # (H, W)
            if record.mask_path is not None or isinstance(record.region, str):
                width, height = image.size
                item["image_size"] = (height, width)
                for key, field_name, path in (
                    ("mask", "mask_path", record.mask_path),
                    ("region_mask", "region", record.region),
                ):
                    if isinstance(path, str):
                        item[key] = _original_mask(path, record.id, field_name, (height, width), limit)
                if "region_mask" in item and self.region_grid_size is not None:
                    item["region_mask_input"], item["region_weights"] = region_inputs(
                        item["region_mask"], grid_size=self.region_grid_size, image_transform=self.transform
                    )  # (H_in, W_in) bool, (G, G)
        except DataError as e:
            raise DataError(f"{e} ({LOAD_HINT})", e.problem) from None
        return item


def _original_mask(
    path: str, record_id: str, field_name: str, image_hw: tuple[int, int], max_pixels: int
) -> torch.Tensor:
    """(H, W) bool tensor at the original resolution; its size must be the image's."""
    mask = load_mask(path, record=record_id, field_name=field_name, max_pixels=max_pixels)  # (H, W) bool
    if mask.shape != image_hw:
        raise DataError(
            f"{path}: record {record_id}: field '{field_name}': mask is {mask.shape[1]}x{mask.shape[0]}"
            f" but its image is {image_hw[1]}x{image_hw[0]}"
        )
    return torch.from_numpy(mask)


class Collator:
    """Pads a list of dataset items: right padding for training, left padding for generation.

    Masks keep their original (per-image) resolutions, so they stay lists: ``masks`` and
    ``region_masks`` hold an (H_i, W_i) bool tensor or None per sample, ``image_sizes`` the
    original (H_i, W_i) or None. These keys are present when a sample of the batch has a mask.
    Grounded models' tensors: ``sam_pixel_values`` (B, 3, S, S) with ``sam_resized_sizes``, and the
    regions sample by sample: ``region_masks_input`` (R, H_in, W_in) bool (each region mask aligned with
    ``pixel_values``; the model pools it either way), ``region_weights`` (R, G, G) (its soft patch coverage,
    what the "area" pooling uses) and ``region_batch_index`` (R,).
    """

    def __init__(self, *, pad_token_id: int, padding_side: str) -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [it["input_ids"] for it in items]
        input_ids = pad_batch(ids, self.pad_token_id, self.padding_side)  # (B, T)
        attention_mask = pad_batch([[1] * len(s) for s in ids], 0, self.padding_side)  # (B, T)
        labels = pad_batch([it["labels"] for it in items], IGNORE_INDEX, self.padding_side)  # (B, T)
        images = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        task_ids = torch.tensor([it["task_id"] for it in items], dtype=torch.long)  # (B,)
        has_image = torch.tensor([it["pixel_values"] is not None for it in items])  # (B,)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack(images) if images else None,  # (N_img, 3, H, W)
            "task_ids": task_ids,
            "image_task_ids": task_ids[has_image],  # (N_img,)
            "truncated": sum(bool(it["truncated"]) for it in items),
            "records": [it["record"] for it in items],
        }
        if any("image_size" in it for it in items):
            batch["masks"] = [it.get("mask") for it in items]  # B x (H_i, W_i) bool | None
            batch["region_masks"] = [it.get("region_mask") for it in items]  # B x (H_i, W_i) bool | None
            batch["image_sizes"] = [it.get("image_size") for it in items]  # B x (H_i, W_i) | None
        if any("sam_pixel_values" in it for it in items):  # grounding model: SAM inputs, zeros without an image
            sam = [it.get("sam_pixel_values") for it in items]
            blank = torch.zeros_like(next(s for s in sam if s is not None))  # (3, S, S)
            batch["sam_pixel_values"] = torch.stack([blank if s is None else s for s in sam])  # (B, 3, S, S)
            batch["sam_resized_sizes"] = [it.get("sam_resized_size") for it in items]  # B x (h, w) | None
        regions = [(b, it) for b, it in enumerate(items) if "region_weights" in it]
        if regions:  # grounded model with a region encoder: the region masks in reading order
            batch["region_masks_input"] = torch.stack([it["region_mask_input"] for _, it in regions])  # (R, H_in, W_in)
            batch["region_weights"] = torch.stack([it["region_weights"] for _, it in regions])  # (R, G, G)
            batch["region_batch_index"] = torch.tensor([b for b, _ in regions], dtype=torch.long)  # (R,)
        return batch
