"""`attnserve batch` on a real local Ray (Ray Data): text and image jobs end to end, bad rows mixed
in, JSONL and Parquet in and out, and every answer equal to what the online path returns for the
same input (the servicer's validation, the engine's ModelRunner, the gRPC response mapping)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from attnserve.core.errors import RequestError
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from attnserve.service.batch.decode_actor import prepare
from attnserve.service.batch.job import BatchConfig, run_batch
from attnserve.service.batch.reader import InputError, input_format, iter_rows
from attnserve.service.grpc_mapping import caption_to_pb, translation_to_pb
from tests.conftest import BUNDLED_REPOSITORY, ROOT, bundled_entry
from tests.helpers import answers

pytestmark = pytest.mark.integration
SCENES = ROOT / "examples" / "byom" / "fashion-scenes" / "images"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray (2 CPUs) for the module's jobs."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def fp32_serve_config(tmp_path_factory) -> Path:
    """The CPU serve config at fp32: a dynamically quantised (int8) model scales activations per
    batch, so its answers depend on which rows share a batch; fp32 answers do not."""
    import yaml

    config = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    for app in config["applications"]:
        app["args"]["runtime"]["precision"] = "fp32"
    path = tmp_path_factory.mktemp("serve") / "attnserve-fp32.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _manifest(name: str) -> Manifest:
    return Manifest.load(bundled_entry(name))


def _run(tmp_path: Path, model: str, source: Path, serve_config: Path, **options) -> list[dict]:
    """Runs a job; returns its output rows."""
    out = tmp_path / "out"
    result = run_batch(
        BatchConfig(
            model=model,
            input=source,
            output=out,
            repository=BUNDLED_REPOSITORY,
            serve_config=serve_config,
            **options,
        )
    )
    fmt = options.get("format", "jsonl")
    if fmt == "parquet":
        rows = pa.concat_tables([pq.read_table(p) for p in result.parts]).to_pylist()
    else:
        rows = [json.loads(line) for p in result.parts for line in p.read_text("utf-8").splitlines()]
    assert all(p.suffix == (".parquet" if fmt == "parquet" else ".json") for p in result.parts)
    assert result.rows == len(rows)
    assert result.errors == sum(r["error"] is not None for r in rows)
    return rows


def _assert_online_answers(manifest: Manifest, source: Path, rows: list[dict], attention: bool) -> None:
    """Each output row equals the online path's answer for the same input row, one row at a time."""
    by_id = {r["id"]: r for r in rows}
    images = manifest.image is not None
    inputs = list(iter_rows(source, input_format(source, images), images))
    assert len(by_id) == len(rows) == len(inputs)  # one output row per input row
    runner = ModelRunner(manifest)
    mode = AttentionMode.CROSS if attention else AttentionMode.NONE
    for row in inputs:
        got = by_id[row["id"]]
        try:
            (result,) = answers(runner, [prepare(runner.codec, row, mode)])
        except RequestError as e:
            result = e
        if isinstance(result, RequestError):
            assert got["error"] == {"code": result.code.value, "message": result.message}
            assert got["output"] is None
            continue
        assert got["error"] is None
        online = caption_to_pb(result, manifest) if images else translation_to_pb(result, manifest)
        assert got["output"] == online.text
        assert got["output_tokens"] == list(online.output_tokens)
        if not attention:
            assert "attention" not in got
            continue
        a = got["attention"]
        if images:
            assert (a["steps"], a["grid_height"], a["grid_width"]) == (
                online.attention.steps,
                online.attention.grid_height,
                online.attention.grid_width,
            )
            assert a["labels"] == list(online.attention.labels)
        else:
            assert (a["rows"], a["cols"]) == (online.attention.rows, online.attention.cols)
            assert (a["row_labels"], a["col_labels"]) == (
                list(online.attention.row_labels),
                list(online.attention.col_labels),
            )
        np.testing.assert_allclose(a["weights"], online.attention.weights, atol=2e-5)


def test_dates_jsonl_with_locales_and_bad_rows(tmp_path, fp32_serve_config):
    from attnserve.models import dates_data

    lines = [
        json.dumps({"id": f"d{i}", "text": e.text, "locale": e.locale})
        for i, e in enumerate(dates_data.sample("test", 40, seed=3))
    ]
    lines[5:5] = [
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": 17, "locale": "de"}),  # no text; a number id
        json.dumps({"text": "7. März 2024", "locale": 5}),
        json.dumps({"text": "x" * 500}),  # too long
        json.dumps({"text": "   "}),
        "",  # blank lines are not rows
        json.dumps({"text": "7 мар. 2024 г.", "locale": "ru"}),  # no id: its row number
    ]
    source = tmp_path / "dates.jsonl"
    source.write_text("\n".join(lines) + "\n", "utf-8")
    rows = _run(tmp_path, "dates-luong", source, fp32_serve_config, attention=True)
    by_id = {r["id"]: r for r in rows}
    assert by_id["5"]["error"]["message"].startswith("row 5 is not JSON")
    assert by_id["6"]["error"]["message"] == "row 6 is not a JSON object"
    assert by_id["17"]["error"]["message"] == 'the row has no "text" string'
    assert {r["error"]["code"] for r in rows if r["error"]} == {"INVALID_ARGUMENT"}
    assert sum(r["error"] is None for r in rows) == 41
    _assert_online_answers(_manifest("dates-luong"), source, rows, attention=True)


def test_tsv_in_parquet_out_with_per_word_attention(tmp_path, fp32_serve_config):
    from attnserve.models.g2p_data import load_split

    words = [e.word for e in load_split("test")[:60:2]] + ["naïve", "", "a" * 40]
    source = tmp_path / "words.tsv"
    source.write_text("".join(f"{w}\tignored column\n" for w in words), "utf-8")
    rows = _run(tmp_path, "g2p-transformer", source, fp32_serve_config, attention=True, format="parquet")
    assert sum(r["error"] is not None for r in rows) == 3
    _assert_online_answers(_manifest("g2p-transformer"), source, rows, attention=True)


def test_parquet_in_without_attention(tmp_path, fp32_serve_config):
    source = tmp_path / "words.parquet"
    table = pa.table({"id": ["a", "b", None, "d"], "text": ["attention", None, "serving", "rays"]})
    pq.write_table(table, source, row_group_size=2)
    rows = _run(tmp_path, "g2p-bahdanau", source, fp32_serve_config)
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == ["2", "a", "b", "d"]
    _assert_online_answers(_manifest("g2p-bahdanau"), source, rows, attention=False)


def test_folder_of_images_with_a_corrupt_one_and_two_actors(tmp_path, fp32_serve_config):
    folder = tmp_path / "scenes"
    (folder / "more").mkdir(parents=True)
    for i, scene in enumerate(sorted(SCENES.glob("*.png"))[:12]):
        shutil.copy(scene, folder / ("more" if i % 3 == 0 else ".") / scene.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    rows = _run(
        tmp_path, "caption-fashion", folder, fp32_serve_config, attention=True, format="parquet", actors=2
    )
    assert len(rows) == 13
    assert "more/scene-000.png" in {r["id"] for r in rows}
    (broken,) = [r for r in rows if r["error"]]
    assert broken["id"] == "broken.png" and broken["error"]["code"] == "INVALID_ARGUMENT"
    _assert_online_answers(_manifest("caption-fashion"), folder, rows, attention=True)


def test_jsonl_image_rows_relative_to_the_file(tmp_path, fp32_serve_config):
    source = tmp_path / "images.jsonl"
    shutil.copytree(SCENES, tmp_path / "images", ignore=lambda d, names: sorted(names)[6:])
    rows = [{"id": f"s{i}", "image": f"images/scene-00{i}.png"} for i in range(6)]
    rows += [{"id": "missing", "image": "images/nope.png"}, {"id": "no-path"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    out = _run(tmp_path, "caption-fashion", source, fp32_serve_config)
    errors = {r["id"]: r["error"]["message"] for r in out if r["error"]}
    assert errors == {
        "missing": "cannot read image 'images/nope.png' (No such file or directory)",
        "no-path": 'the row has no "image" path',
    }
    _assert_online_answers(_manifest("caption-fashion"), source, out, attention=False)


def test_refuses_what_it_cannot_read_before_decoding(tmp_path):
    words = tmp_path / "words.csv"
    words.write_text("a\n")
    with pytest.raises(InputError, match="format"):
        run_batch(
            BatchConfig(
                model="g2p-bahdanau", input=words, output=tmp_path / "o", repository=BUNDLED_REPOSITORY
            )
        )
    with pytest.raises(InputError, match="folder of images"):
        run_batch(
            BatchConfig(
                model="caption-fashion",
                input=words.rename(tmp_path / "words.tsv"),
                output=tmp_path / "o",
                repository=BUNDLED_REPOSITORY,
            )
        )
    with pytest.raises(InputError, match="no model 'nope'"):
        run_batch(
            BatchConfig(model="nope", input=words, output=tmp_path / "o", repository=BUNDLED_REPOSITORY)
        )


def test_cli_writes_parts_and_pictures_of_the_first_rows(tmp_path):
    """The command as the README runs it, on the running Ray (--address): a summary line, pictures."""
    source = tmp_path / "words.jsonl"
    source.write_text("".join(json.dumps({"text": w}) + "\n" for w in ["attention", "pictures", "bad!"]))
    exe = str(Path(sys.executable).with_name("attnserve"))
    cmd = [
        exe,
        "batch",
        "--model",
        "g2p-bahdanau",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out"),
        "--repository",
        str(BUNDLED_REPOSITORY),
        "--plot-first",
        "2",
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 rows (1 errors)" in done.stdout
    pictures = sorted((tmp_path / "out" / "plots").iterdir())
    assert [p.name for p in pictures] == ["00000-0.png", "00001-1.png"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert again.returncode == 2 and "is not empty" in again.stderr
