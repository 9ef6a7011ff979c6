"""Decode every image and mask of a record list: what ``medpipe data check`` and
``data.verify_images`` run before training, so a corrupt file is found up front, not in a worker.

Each distinct image and mask is decoded once. Problems go to the :class:`ProblemLog` (raise under
``error``, skip and count under ``skip``): ``missing_image``, ``corrupt_image``, ``image_too_large`` (a
decompression bomb, found from the header), ``missing_mask``, ``corrupt_mask``, ``mask_too_large``,
``bad_mask`` (a float mask with fractional values) and ``mask_size_mismatch`` (a mask must have its
image's size).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from datamodules.images import DEFAULT_MAX_IMAGE_PIXELS, load_image, load_mask
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


def verify_records(
    records: list[Record], problems: ProblemLog, *, max_pixels: Mapping[str, int] | None = None
) -> list[Record]:
    """The records whose image and masks decode and agree in size; the others are reported.

    ``max_pixels``: dataset name -> the most pixels an image or mask may have (``max_image_pixels``; default
    :data:`DEFAULT_MAX_IMAGE_PIXELS`), checked from the header before anything is decoded.
    """
    sizes: dict[object, tuple[int, int] | DataError] = {}  # image path or bytes -> (W, H) or its error
    masks: dict[str, tuple[int, int] | DataError] = {}  # mask path -> (W, H) or its error
    kept: list[Record] = []
    for record in records:
        limit = pixel_limit(record, max_pixels)
        if record.has_image and not _image_ok(record, sizes, problems, limit):
            continue
        size = sizes.get(record.image_path if record.image_path is not None else record.image_bytes)
        if all(
            _mask_ok(record, field_name, path, size, masks, problems, limit)
            for field_name, path in record_masks(record)
        ):
            kept.append(record)
    return kept


def pixel_limit(record: Record, max_pixels: Mapping[str, int] | None) -> int:
    """The pixel limit of ``record``'s dataset."""
    return (max_pixels or {}).get(record.dataset, DEFAULT_MAX_IMAGE_PIXELS)


def _image_ok(record: Record, sizes: dict, problems: ProblemLog, limit: int) -> bool:
    key = record.image_path if record.image_path is not None else record.image_bytes
    if key not in sizes:
        try:
            sizes[key] = load_image(record.image_path, record.image_bytes, record=record.id, max_pixels=limit).size
        except DataError as e:
            sizes[key] = e
    found = sizes[key]
    if isinstance(found, DataError):
        source = record.image_path or f"{record.source.file if record.source else record.dataset} (embedded image)"
        problems.report(source, record.id, "image", found.problem.reason, found.problem.kind)
        return False
    return True


def _mask_ok(
    record: Record,
    field_name: str,
    path: str,
    image_size: tuple[int, int] | None,
    masks: dict,
    problems: ProblemLog,
    limit: int,
) -> bool:
    if path not in masks:
        try:
            mask = load_mask(path, record=record.id, field_name=field_name, max_pixels=limit)
            masks[path] = (mask.shape[1], mask.shape[0])  # (H, W) -> (W, H) like PIL sizes
        except DataError as e:
            masks[path] = e
    found = masks[path]
    if isinstance(found, DataError):
        problems.report(path, record.id, field_name, found.problem.reason, found.problem.kind)
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
