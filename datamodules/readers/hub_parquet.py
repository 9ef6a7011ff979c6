"""Hub exports (VQA-RAD, PathVQA): ``data/<split>-*.parquet`` with ``image``, ``question``, ``answer``.

``image`` is the datasets-library image struct ``{bytes, path}`` (a plain binary or path column is
accepted too). A row is closed when its normalised answer is yes/no or an ``answer_type`` column
says closed (yes/no, CLOSED), else open. The encoded bytes are kept on the
record (decoded only when a sample is loaded) and shared between the rows of one image, so a
split costs about the size of its distinct images. Rows are read in batches, never the whole file.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.problems import ProblemLog, file_error
from datamodules.readers.common import Fields, PathResolver, answer_type_of, json_type, record_label
from datamodules.records import Record, Source

REQUIRED_COLUMNS = ("image", "question", "answer")
BATCH_ROWS = 512


def parquet_files(root: Path, split: str) -> list[Path]:
    """``data/<split>-*.parquet`` sorted (names may carry shard numbers and hash suffixes)."""
    return sorted((Path(root) / "data").glob(f"{split}-*.parquet"))


def has_parquet(root: Path) -> bool:
    return any((Path(root) / "data").glob("*.parquet"))


def parquet_splits(root: Path, names: tuple[str, ...]) -> list[str]:
    return [s for s in names if parquet_files(root, s)]


def read_hub_parquet(
    root: str | Path, split: str, *, dataset: str, problems: ProblemLog, check_images: bool = True
) -> list[Record]:
    """Records of one split; ids are ``<dataset>/<split>/<row>`` counted over the split's shards."""
    import pyarrow.parquet as pq

    root = Path(root)
    files = parquet_files(root, split)
    if not files:
        raise file_error(
            root / "data" / f"{split}-*.parquet",
            "<file>",
            f"no parquet file for split {split!r} in {root / 'data'}",
            "missing_file",
        )
    paths = PathResolver(root, check_exists=check_images)  # rows that carry only an image path
    shared: dict[bytes, bytes] = {}  # one bytes object per distinct image
    records: list[Record] = []
    row = 0
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
            raise file_error(file, "<parquet>", f"unreadable parquet file ({e})", "malformed_parquet") from None
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise file_error(file, missing[0], f"missing column(s) {missing}; columns are {names}", "missing_field")
        columns = list(REQUIRED_COLUMNS) + (["answer_type"] if "answer_type" in names else [])
        in_file = 0
        source = Source(str(file), "<row>", "question")  # one object shared by the file's records
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except (OSError, ValueError) as e:  # a corrupt page: the rest of the file is unreadable
                raise file_error(
                    file, "<parquet>", f"unreadable parquet data after row {in_file} ({e})", "malformed_parquet"
                ) from None
            if batch is None:
                break
            for item in batch.to_pylist():
                rid = f"{dataset}/{split}/{row}"
                label = record_label(in_file, rid)
                row += 1
                in_file += 1
                record = _record(
                    item,
                    rid=rid,
                    label=label,
                    file=file,
                    source=source,
                    split=split,
                    dataset=dataset,
                    problems=problems,
                    paths=paths,
                    shared=shared,
                )
                if record is not None:
                    records.append(record)
    return records


def _record(
    item: dict,
    *,
    rid: str,
    label: str,
    file: Path,
    source: Source,
    split: str,
    dataset: str,
    problems: ProblemLog,
    paths: PathResolver,
    shared: dict[bytes, bytes],
) -> Record | None:
    fields = Fields(item, file=file, record=label, problems=problems)
    question = fields.text("question", what="question")
    answer = fields.text("answer", what="answer")
    answer_type = answer_type_of(fields, answer or "", yes_no_closes=True)
    image = item.get("image")
    if isinstance(image, (bytes, str)):  # a plain binary or path column instead of the {bytes, path} struct
        image = {"bytes": image} if isinstance(image, bytes) else {"path": image}
    elif image is None:
        image = {}
    elif not isinstance(image, dict):
        fields.report("image", f"expected an image struct {{bytes, path}}, got {json_type(image)}", "wrong_type")
    if not fields.ok:
        return None
    data, image_path = image.get("bytes"), None
    if data is not None and not isinstance(data, bytes):
        fields.report("image.bytes", f"expected bytes, got {json_type(data)}", "wrong_type")
    path = image.get("path")  # "" as null: the datasets library writes "" for an embedded image's name
    name = fields.text("image.path", what="path", optional=True, value=None if path == "" else path)
    if not fields.ok:
        return None
    if data:
        data = shared.setdefault(data, data)
    elif name is not None:  # an export that references files beside it instead of embedding them
        image_path = paths.resolve(name, file=file, record=label, field_name="image.path", problems=problems)
        if image_path is None:
            return None
    else:
        fields.report("image", "no image bytes and no path", "missing_image")
        return None
    return Record(
        id=rid,
        dataset=dataset,
        split=split,
        question=question,
        answer=answer,
        answer_type=answer_type,
        image_path=image_path,
        image_bytes=data or None,
        extra={"image_name": name},
        source=source,
    )
