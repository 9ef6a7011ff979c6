"""Map-style dataset over records and the collator that pads them into batches."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.encoding import IGNORE_INDEX, ConversationEncoder, pad_batch
from datamodules.images import ImageTransform, load_image
from datamodules.records import Record


class VQADataset(Dataset):
    """Decodes the image and tokenises one record per item (so both run in loader workers)."""

    def __init__(self, records: list[Record], *, encoder: ConversationEncoder, transform: ImageTransform,
                 with_answers: bool, task_ids: dict[str, int] | None = None) -> None:
        self.records = records
        self.encoder = encoder
        self.transform = transform
        self.with_answers = with_answers
        self.task_ids = task_ids or {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        encoded = self.encoder.encode(record, with_answers=self.with_answers)
        pixel_values = None
        if record.has_image:
            image = load_image(record.image_path, record.image_bytes, record=record.id)
            pixel_values = self.transform(image)  # (3, H, W)
        return {"record": record, "input_ids": encoded.input_ids, "labels": encoded.labels,
                "truncated": encoded.truncated, "pixel_values": pixel_values,
                "task_id": self.task_ids.get(record.task, 0)}


class Collator:
    """Pads a list of dataset items: right padding for training, left padding for generation."""

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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack(images) if images else None,  # (N_img, 3, H, W)
            "task_ids": task_ids,
            "image_task_ids": task_ids[has_image],  # (N_img,)
            "truncated": sum(bool(it["truncated"]) for it in items),
            "records": [it["record"] for it in items],
        }
