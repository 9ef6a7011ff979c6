"""Write hub-export parquet files: ``image`` ({bytes, path}), ``question``, ``answer``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode_image(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    """(H, W) uint8 grayscale -> encoded RGB bytes (the releases store RGB JPEGs)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format=fmt, quality=95)
    return buf.getvalue()


def write_hub_parquet(path: Path, rows: list[dict]) -> None:
    """One shard; ``rows`` are ``{"image": {"bytes", "path"}, "question", "answer"}`` dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("answer", pa.string()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
