"""Batch input parsing takes any bytes: one row per input row, an error instead of an exception."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.service.batch.rows import jsonl_rows, lines, tsv_rows

ANY_LINE = st.binary(max_size=80).map(lambda b: b.replace(b"\n", b""))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "text", "locale", "x"]), inner)
    ),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 16))
def test_lines_split_a_stream_like_bytes_split_whatever_the_chunk_size(data, chunk):
    expected = data.split(b"\n")
    if expected and expected[-1] == b"":
        expected.pop()
    assert list(lines(io.BytesIO(data), chunk)) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(ANY_LINE | JSON_VALUES.map(lambda v: json.dumps(v).encode()), max_size=12))
def test_every_jsonl_row_is_answered_once_with_text_or_an_error(raw):
    rows = list(jsonl_rows(raw, base=Path("/nonexistent"), images=False))
    assert len(rows) == sum(1 for r in raw if r.strip())
    for row in rows:
        assert isinstance(row["id"], str)
        if row["error"] is None:
            assert isinstance(row["text"], str) and isinstance(row["locale"], str)
        else:
            assert isinstance(row["error"], str) and row["error"]


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_LINE, max_size=12))
def test_every_tsv_row_is_answered_once(raw):
    rows = list(tsv_rows(raw))
    assert [r["id"] for r in rows] == [str(i) for i in range(len(raw))]
    for line, row in zip(raw, rows, strict=True):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            assert row["error"].endswith("is not UTF-8")
            continue
        assert row["error"] is None and row["text"] == text.rstrip("\r").split("\t")[0]


def test_image_rows_read_files_relative_to_the_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png bytes")
    raw = [b'{"id": "a", "image": "a.png"}', b'{"image": "../nope.png"}', b'{"image": 5}']
    rows = list(jsonl_rows(raw, tmp_path, images=True))
    assert rows[0]["image"] == b"png bytes" and rows[0]["error"] is None
    assert rows[1]["id"] == "1" and rows[1]["error"].startswith("cannot read image '../nope.png'")
    assert rows[2]["error"] == 'the row has no "image" path'


def test_rows_carry_the_scores_of_the_engine_and_nulls_for_errors(bundled_manifest):
    from attnserve.core.engine import Engine, EngineConfig
    from attnserve.core.model_runner import ModelRunner
    from attnserve.core.requests import AttentionMode
    from attnserve.service.batch.decode_actor import decode_rows
    from attnserve.service.batch.rows import input_row, output_table

    runner = ModelRunner(bundled_manifest)
    rows = [input_row("a", "attention"), input_row("b", "bad!"), input_row("c", "scores")]
    with Engine(runner, EngineConfig()) as engine:
        results = list(decode_rows(engine, rows, AttentionMode.NONE, scores=True))
        alone = [
            engine.submit(runner.codec.prepare(w, AttentionMode.NONE, scores=True))
            for w in ("attention", "scores")
        ]
        alone = [future.result(30).scores for future in alone]
    table = output_table(["a", "b", "c"], results, bundled_manifest, attention=False, scores=True).to_pylist()
    assert table[1]["score"] is None and table[1]["token_logprobs"] is None and table[1]["error"]
    for row, want in zip((table[0], table[2]), alone, strict=True):
        assert row["score"] == pytest.approx(want.score, abs=1e-5)
        assert row["token_logprobs"] == pytest.approx(list(want.token_logprobs), abs=1e-5)
        assert len(row["token_logprobs"]) == len(row["output_tokens"])
