"""Reads a batch job's input into a Ray Dataset of INPUT_SCHEMA rows, streaming.

JSONL, TSV and Parquet files are read by one datasource a block at a time (a row's default id is
its row number, so each file is read by one task); a folder of images by Ray's binary reader,
each image's id being its path relative to the folder.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from attnserve.service.batch.rows import INPUT_SCHEMA, input_row, jsonl_rows, lines, table_rows, tsv_rows

BLOCK_ROWS = 1024  # input rows per block a read task yields
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
# Reading (and writing) reserves no CPU: the decode actors reserve the CPUs, and a read task that
# waited for a CPU they hold would never run. Without a CPU to bound them, at most two such tasks
# run at once (each is a worker process); Ray Data's backpressure bounds what is read ahead.
IO_TASK = {"num_cpus": 0, "concurrency": 2}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".txt": "tsv", ".parquet": "parquet"}


class InputError(ValueError):
    """The input cannot be read as the model's kind of input."""


def input_format(path: Path, images: bool) -> str:
    """ "images" (a folder), "jsonl", "tsv" or "parquet", from the path.

    Raises:
        InputError: for a missing path, an unknown suffix, or input the model cannot take.
    """
    if path.is_dir():
        if not images:
            raise InputError(f"{path} is a folder; a text model reads a JSONL, TSV or Parquet file")
        return "images"
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"cannot tell the format of {path.name}; use .jsonl, .tsv or .parquet")
    if images and kind != "jsonl":
        raise InputError('an image model reads a folder of images or JSONL rows {"id", "image"}')
    return kind


def iter_rows(path: Path, kind: str, images: bool) -> Iterator[dict]:
    """Input rows of a local file, in order, without Ray (the datasource reads the same way)."""
    if kind == "images":
        files = sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        return (input_row(str(p.relative_to(path)), image=p.read_bytes()) for p in files)
    stream = path.open("rb")
    return _file_rows(stream, str(path), kind, images)


def _file_rows(stream, path: str, kind: str, images: bool) -> Iterator[dict]:
    """Input rows of one open file."""
    if kind == "parquet":
        table = pq.ParquetFile(stream)
        columns = [c for c in ("id", "text", "locale") if c in table.schema_arrow.names]
        return table_rows(table.iter_batches(BLOCK_ROWS, columns=columns))
    if kind == "tsv":
        return tsv_rows(lines(stream))
    return jsonl_rows(lines(stream), Path(path).parent, images)


class RowsDatasource(FileBasedDatasource):
    """JSONL, TSV or Parquet input rows, a block of BLOCK_ROWS at a time."""

    def __init__(self, paths: str, kind: str, images: bool):
        super().__init__(paths)
        self.kind, self.images = kind, images

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        """Parquet needs random access; lines are read as a stream."""
        if self.kind == "parquet":
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows = _file_rows(f, path, self.kind, self.images)
        while block := list(itertools.islice(rows, BLOCK_ROWS)):
            yield pa.Table.from_pylist(block, schema=INPUT_SCHEMA)


def read_inputs(path: Path, kind: str, images: bool) -> ray.data.Dataset:
    """The input as a streaming Dataset of INPUT_SCHEMA rows.

    Raises:
        InputError: if a Parquet file has no `text` column or a folder holds no images.
    """
    path = path.resolve()
    if kind == "images":
        if not any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in path.rglob("*")):
            raise InputError(f"no PNG or JPEG images under {path}")
        extensions = [e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())]
        files = ray.data.read_binary_files(
            str(path), include_paths=True, file_extensions=extensions, **IO_TASK
        )
        return files.map_batches(
            _image_rows, fn_kwargs={"root": str(path)}, batch_format="pyarrow", **IO_TASK
        )
    if kind == "parquet" and "text" not in pq.read_schema(path).names:
        raise InputError(f"{path.name} has no `text` column")
    # one file is one read task (its rows are numbered in order): no concurrency to bound
    return ray.data.read_datasource(RowsDatasource(str(path), kind, images), num_cpus=0)


def _image_rows(files: pa.Table, root: str) -> pa.Table:
    """Input rows of (bytes, path) rows of Ray's binary reader."""
    prefix = root.rstrip("/") + "/"
    ids = [p.removeprefix(prefix) for p in files.column("path").to_pylist()]
    rows = [input_row(i, image=b) for i, b in zip(ids, files.column("bytes").to_pylist(), strict=True)]
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)
