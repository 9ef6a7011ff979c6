"""Decode every image and mask of a record list: what ``medpipe data check`` and
``data.verify_images`` run before training, so a corrupt file is found up front, not in a worker.

Each distinct image and mask is decoded once. Problems go to the :class:`ProblemLog` (raise under
``error``, skip and count under ``skip``): ``missing_image``, ``corrupt_image``, ``missing_mask``,
``corrupt_mask`` and ``mask_size_mismatch`` (a mask must have its image's size).
"""

from __future__ import annotations

from collections.abc import Iterator

from datamodules.images import load_image, load_mask
from datamodules.problems import DataError, ProblemLog
from datamodules.records import Record


def record_masks(record: Record) -> Iterator[tuple[str, str]]:
    """(field, path) of every mask a record refers to: grounding targets and region prompts."""
    targets = record.extra.get("mask_paths") or ([record.mask_path] if record.mask_path else [])
    regions = record.extra.get("regions") or ([record.region] if isinstance(record.region, str) else [])
    for path in targets:
        yield "mask_path", path
    for path in regions:
        yield "region", path


def verify_records(records: list[Record], problems: ProblemLog) -> list[Record]:
    """The records whose image and masks decode and agree in size; the others are reported."""
    sizes: dict[object, tuple[int, int] | DataError] = {}  # image path or bytes -> (W, H) or its error
    masks: dict[str, tuple[int, int] | DataError] = {}  # mask path -> (W, H) or its error
    kept: list[Record] = []
    for record in records:
        if record.has_image and not _image_ok(record, sizes, problems):
            continue
        size = sizes.get(record.image_path if record.image_path is not None else record.image_bytes)
        if all(_mask_ok(record, field_name, path, size, masks, problems) for field_name, path in record_masks(record)):
            kept.append(record)
    return kept


def _image_ok(record: Record, sizes: dict, problems: ProblemLog) -> bool:
    key = record.image_path if record.image_path is not None else record.image_bytes
    if key not in sizes:
        try:
            sizes[key] = load_image(record.image_path, record.image_bytes, record=record.id).size
        except DataError as e:
            sizes[key] = e
    found = sizes[key]
    if isinstance(found, DataError):
        missing = "not found" in str(found)
        source = record.image_path or f"{record.extra.get('file', record.dataset)} (embedded image)"
        problems.report(
            source,
            record.id,
            "image",
            "file not found" if missing else _reason(found),
            "missing_image" if missing else "corrupt_image",
        )
        return False
    return True


def _mask_ok(
    record: Record, field_name: str, path: str, image_size: tuple[int, int] | None, masks: dict, problems: ProblemLog
) -> bool:
    if path not in masks:
        try:
            mask = load_mask(path, record=record.id, field_name=field_name)
            masks[path] = (mask.shape[1], mask.shape[0])  # (H, W) -> (W, H) like PIL sizes
        except DataError as e:
            masks[path] = e
    found = masks[path]
    if isinstance(found, DataError):
        missing = "not found" in str(found)
        problems.report(
            path,
            record.id,
            field_name,
            "file not found" if missing else _reason(found),
            "missing_mask" if missing else "corrupt_mask",
        )
        return False
    if image_size is not None and found != image_size:
        problems.report(
            path,
            record.id,
            field_name,
            f"mask is {found[0]}x{found[1]} but its image is "
            f"{image_size[0]}x{image_size[1]} (masks are scored at the image's resolution)",
            "mask_size_mismatch",
        )
        return False
    return True


def _reason(error: DataError) -> str:
    """The reason part of a ``file: record r: field 'f': reason`` message."""
    message = str(error)
    cut = message.find("': ")
    return message[cut + 3 :] if cut >= 0 else message
