"""The rows a batch job reads and writes: parsing untrusted input rows, and the output schema.

Input rows, whatever the file, become `{id, text, locale, image, error}`: `error` holds the
message of a row that cannot be read (bad JSON, no text, a missing image), so it is answered with
INVALID_ARGUMENT like any other bad request instead of stopping the job. Output rows mirror the
gRPC responses: `attention` has the fields (and meaning) of an AttentionMatrix for text models and
of AttentionMaps for caption models; `score` and `token_logprobs` those of the responses' fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from attnserve.core.manifest import Manifest
from attnserve.core.requests import Answer

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


def output_schema(manifest: Manifest, attention: bool, scores: bool = False) -> pa.Schema:
    """The output rows' schema for a model: id, output, output_tokens, error (+ attention, + score
    and token_logprobs)."""
    fields = [("id", pa.string()), ("output", pa.string()), ("output_tokens", pa.list_(pa.string())),
              ("error", ERROR)]  # fmt: skip
    if attention:
        fields.append(("attention", IMAGE_ATTENTION if manifest.image else TEXT_ATTENTION))
    if scores:
        fields += [("score", pa.float64()), ("token_logprobs", pa.list_(pa.float32()))]
    return pa.schema(fields)


def output_table(
    ids: list[str], results: list, manifest: Manifest, attention: bool, scores: bool = False
) -> pa.Table:
    """The output rows of a batch: the text and tokens, or each row's error; attention as the gRPC
    response has it, built column-wise from the numpy matrices (no Python float per weight); the
    score and each token's log-probability when asked for (null for a row in error)."""
    ok = [isinstance(r, Answer) for r in results]
    columns = {
        "id": pa.array(ids, pa.string()),
        "output": pa.array(
            [r.text if good else None for r, good in zip(results, ok, strict=True)], pa.string()
        ),
        "output_tokens": pa.array(
            [list(r.output_tokens) if good else None for r, good in zip(results, ok, strict=True)],
            pa.list_(pa.string()),
        ),
        "error": pa.array(
            [
                None if good else {"code": r.code.value, "message": r.message}
                for r, good in zip(results, ok, strict=True)
            ],
            ERROR,
        ),
    }
    if attention:
        matrices = [r.attention if good else None for r, good in zip(results, ok, strict=True)]
        columns["attention"] = _attention_column(results, matrices, manifest)
    if scores:
        scored = [r.scores if good else None for r, good in zip(results, ok, strict=True)]
        columns["score"] = pa.array([None if s is None else s.score for s in scored], pa.float64())
        columns["token_logprobs"] = pa.array(
            [None if s is None else list(s.token_logprobs) for s in scored], pa.list_(pa.float32())
        )
    return pa.table(columns, schema=output_schema(manifest, attention, scores))


def _attention_column(results: list, matrices: list, manifest: Manifest) -> pa.StructArray:
    """AttentionMatrix (text) or AttentionMaps (caption) structs; null where a row has none."""
    present = [a is not None for a in matrices]
    flat = [a.ravel() if a is not None else np.empty(0, np.float32) for a in matrices]
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in flat])]).astype(np.int32)
    weights = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat).astype(np.float32)))

    def ints(values) -> pa.Array:
        return pa.array(values, pa.int32())

    def labels(pick) -> pa.Array:
        return pa.array([list(pick(r)) if p else [] for r, p in zip(results, present, strict=True)],
                        pa.list_(pa.string()))  # fmt: skip

    shapes = [a.shape if a is not None else (0, 0) for a in matrices]
    if manifest.image is not None:
        spec, n = manifest.image, len(matrices)
        arrays = [ints([s[0] for s in shapes]), ints([spec.grid_height] * n), ints([spec.grid_width] * n),
                  weights, labels(lambda r: r.output_tokens)]  # fmt: skip
        struct = IMAGE_ATTENTION
    else:
        arrays = [ints([s[0] for s in shapes]), ints([s[1] for s in shapes]), weights,
                  labels(lambda r: r.output_tokens), labels(lambda r: r.source_tokens)]  # fmt: skip
        struct = TEXT_ATTENTION
    return pa.StructArray.from_arrays(arrays, fields=list(struct), mask=pa.array([not p for p in present]))


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
