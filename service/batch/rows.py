"""The rows a batch job reads and writes: parsing untrusted input rows, and the output schema.

Input rows, whatever the file, become `{id, text, locale, image, error}`: `error` holds the
message of a row that cannot be read (bad JSON, no text, a missing image), so it is answered with
INVALID_ARGUMENT like any other bad request instead of stopping the job. Output rows mirror the
gRPC responses: `attention` has the fields (and meaning) of an AttentionMatrix for text models and
of AttentionMaps for caption models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa

from attnserve.service.core.errors import RequestError
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.translation import Translation

INPUT_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("locale", pa.string()), ("image", pa.binary()),
     ("error", pa.string())]
)  # fmt: skip
ERROR = pa.struct([("code", pa.string()), ("message", pa.string())])
TEXT_ATTENTION = pa.struct(
    [("rows", pa.int32()), ("cols", pa.int32()), ("weights", pa.list_(pa.float32())),
     ("row_labels", pa.list_(pa.string())), ("col_labels", pa.list_(pa.string()))]
)  # fmt: skip
IMAGE_ATTENTION = pa.struct(
    [("steps", pa.int32()), ("grid_height", pa.int32()), ("grid_width", pa.int32()),
     ("weights", pa.list_(pa.float32())), ("labels", pa.list_(pa.string()))]
)  # fmt: skip


def input_row(row_id: str, text: str = "", locale: str = "", image: bytes | None = None, error=None) -> dict:
    """One input row in INPUT_SCHEMA's shape."""
    return {"id": row_id, "text": text, "locale": locale, "image": image, "error": error}


def output_schema(manifest: Manifest, attention: bool) -> pa.Schema:
    """The output rows' schema for a model: id, output, output_tokens, error (+ attention)."""
    fields = [("id", pa.string()), ("output", pa.string()), ("output_tokens", pa.list_(pa.string())),
              ("error", ERROR)]  # fmt: skip
    if attention:
        fields.append(("attention", IMAGE_ATTENTION if manifest.image else TEXT_ATTENTION))
    return pa.schema(fields)


def output_row(row_id: str, result: Translation | RequestError, manifest: Manifest, attention: bool) -> dict:
    """One output row: the text and tokens, or the row's error; attention as the gRPC response has it."""
    if isinstance(result, RequestError):
        row = {"id": row_id, "output": None, "output_tokens": None,
               "error": {"code": result.code.value, "message": result.message}}  # fmt: skip
        return row | ({"attention": None} if attention else {})
    row = {"id": row_id, "output": result.text, "output_tokens": list(result.output_tokens), "error": None}
    if not attention:
        return row
    a = result.attention
    if a is None:
        row["attention"] = None
    elif manifest.image is not None:
        spec = manifest.image
        row["attention"] = {"steps": len(a), "grid_height": spec.grid_height, "grid_width": spec.grid_width,
                            "weights": a.ravel().tolist(), "labels": list(result.output_tokens)}  # fmt: skip
    else:
        row["attention"] = {"rows": a.shape[0], "cols": a.shape[1], "weights": a.ravel().tolist(),
                            "row_labels": list(result.output_tokens),
                            "col_labels": list(result.source_tokens)}  # fmt: skip
    return row


def lines(stream, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, read a chunk at a time (memory bounded by the longest line)."""
    pending = b""
    while chunk := stream.read(chunk_bytes):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def jsonl_rows(raw_lines: Iterable[bytes], base: Path, images: bool) -> Iterator[dict]:
    """Input rows of JSONL: `{"id", "text", "locale"}`, or `{"id", "image"}` (a path relative to
    `base`) for an image model; blank lines are skipped and a row's default id is its row number."""
    number = 0
    for raw in raw_lines:
        if not raw.strip():
            continue
        default_id, number = str(number), number + 1
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            yield input_row(default_id, error=f"row {default_id} is not JSON ({e})")
            continue
        if not isinstance(value, dict):
            yield input_row(default_id, error=f"row {default_id} is not a JSON object")
            continue
        row_id = value.get("id", default_id)
        row_id = row_id if isinstance(row_id, str) else json.dumps(row_id)
        yield _image_row(row_id, value, base) if images else _text_row(row_id, value)


def _text_row(row_id: str, value: dict) -> dict:
    """A text input row from a parsed JSON object."""
    text, locale = value.get("text"), value.get("locale", "")
    if not isinstance(text, str):
        return input_row(row_id, error='the row has no "text" string')
    if not isinstance(locale, str):
        return input_row(row_id, error='"locale" must be a string')
    return input_row(row_id, text, locale)


def _image_row(row_id: str, value: dict, base: Path) -> dict:
    """An image input row: reads the file its "image" path names (relative to `base`)."""
    name = value.get("image")
    if not isinstance(name, str) or not name:
        return input_row(row_id, error='the row has no "image" path')
    try:
        return input_row(row_id, image=(base / name).read_bytes())
    except OSError as e:
        return input_row(row_id, error=f"cannot read image {name!r} ({e.strerror or type(e).__name__})")


def tsv_rows(raw_lines: Iterable[bytes]) -> Iterator[dict]:
    """Input rows of a TSV whose first column is the text; ids are row numbers."""
    for number, raw in enumerate(raw_lines):
        try:
            text = raw.decode("utf-8").rstrip("\r").split("\t", 1)[0]
        except UnicodeDecodeError:
            yield input_row(str(number), error=f"row {number} is not UTF-8")
            continue
        yield input_row(str(number), text)


def table_rows(batches: Iterable[pa.RecordBatch], start: int = 0) -> Iterator[dict]:
    """Input rows of Arrow record batches with a `text` column (and optional `id`, `locale`)."""
    number = start
    for batch in batches:
        for value in batch.to_pylist():
            row_id = value.get("id")
            row_id = str(number) if row_id is None else str(row_id)
            number += 1
            text, locale = value.get("text"), value.get("locale") or ""
            if not isinstance(text, str):
                yield input_row(row_id, error="the row's text is null")
            else:
                yield input_row(row_id, text, str(locale))
