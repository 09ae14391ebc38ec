"""Attention pictures from real model outputs: size, one panel per word or head, labels, fonts."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from attnserve.service import plotting
from attnserve.service.grpc_mapping import caption_to_pb, translation_to_pb
from tests.conftest import ROOT, bundled_entry
from tests.helpers import answers

SCENE = ROOT / "examples" / "byom" / "fashion-scenes" / "images" / "scene-000.png"


def _decode(name: str, mode: AttentionMode, text: str = "", image: bytes = b""):
    manifest = Manifest.load(bundled_entry(name))
    runner = ModelRunner(manifest)
    codec = runner.codec
    request = codec.prepare_image(image, mode) if image else codec.prepare(text, mode)
    (result,) = answers(runner, [request])
    return manifest, request, result


def _tick_texts(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_translation_heat_map_is_labelled_by_tokens_and_sized_by_them(tmp_path):
    manifest, _, result = _decode("g2p-bahdanau", AttentionMode.CROSS, "attention")
    fig = plotting.response_figure(translation_to_pb(result, manifest))
    heat_map = fig.axes[0]
    assert _tick_texts(heat_map.get_xticklabels()) == list(result.source_tokens)
    assert _tick_texts(heat_map.get_yticklabels()) == list(result.output_tokens)
    np.testing.assert_allclose(heat_map.images[0].get_array(), result.attention, rtol=1e-6)
    short = plotting.save(
        plotting.attention_figure(result.attention[:2, :3], ["a", "b"], ["x", "y", "z"]),
        tmp_path / "short.png",
    )
    path = plotting.save(fig, tmp_path / "word.png")
    width, height = Image.open(path).size
    assert Image.open(short).size < (width, height)  # more tokens, a bigger picture
    assert 200 < width < 1200 and 150 < height < 1000
    assert path.stat().st_size < 100_000


def test_per_head_mode_draws_a_grid_with_one_panel_per_layer_and_head():
    manifest, _, result = _decode("g2p-transformer", AttentionMode.CROSS_HEADS, "heads")
    response = translation_to_pb(result, manifest)
    fig = plotting.response_figure(response)
    assert len(fig.axes) == len(response.attention_heads) == len(result.heads) > 1
    assert [ax.get_title() for ax in fig.axes] == [f"layer {h.layer} head {h.head}" for h in result.heads]
    assert _tick_texts(fig.axes[0].get_yticklabels()) == list(result.output_tokens)


def test_caption_draws_one_panel_per_word_over_the_image(tmp_path):
    image = SCENE.read_bytes()
    manifest, request, result = _decode("caption-fashion", AttentionMode.CROSS, image=image)
    fig = plotting.response_figure(caption_to_pb(result, manifest), image)
    assert [ax.get_title() for ax in fig.axes] == list(result.output_tokens)
    assert fig.get_suptitle() == result.text
    same = plotting.answer_figure(result, manifest, request)  # the batch job's path
    assert [ax.get_title() for ax in same.axes] == list(result.output_tokens)
    first = fig.axes[0].images
    assert first[0].get_array().shape == (manifest.image.height, manifest.image.width)
    assert first[1].get_array().shape == (manifest.image.grid_height, manifest.image.grid_width)
    with pytest.raises(ValueError, match="image"):
        plotting.response_figure(caption_to_pb(result, manifest))
    assert plotting.save(fig, tmp_path / "caption.png").stat().st_size < 100_000


def test_response_without_attention_is_refused():
    manifest, _, result = _decode("g2p-bahdanau", AttentionMode.NONE, "plain")
    with pytest.raises(ValueError, match="no attention"):
        plotting.response_figure(translation_to_pb(result, manifest))


LABELS = ["2024년", "3月", "木曜日", "мар.", "Größe", "été", "ñ"]


def _draw(labels, fonts, tmp_path) -> list[str]:
    """Warnings matplotlib gives while drawing the labels with these fonts."""
    weights = np.random.default_rng(0).random((2, len(labels)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = plotting.attention_figure(weights, labels[:2], labels, "한국어 日本語 русский")
        for ax in fig.axes:
            for label in ax.get_xticklabels() + ax.get_yticklabels() + [ax.title]:
                label.set_fontfamily(fonts)
        plotting.save(fig, tmp_path / "fonts.png")
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_korean_japanese_cyrillic_and_accents_have_glyphs(tmp_path):
    assert _draw(LABELS, plotting.FONTS, tmp_path) == []
    # the check can fail: without the CJK fallback Korean and Japanese glyphs are missing
    assert _draw(LABELS, ["DejaVu Sans"], tmp_path)


def test_plotting_is_an_extra_that_serving_images_leave_out():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"]["plot"])
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    for dockerfile in (ROOT / "deploy" / "docker").glob("Dockerfile*"):
        installs = [line for line in dockerfile.read_text().splitlines() if "pip install" in line]
        assert installs and not any("plot" in line for line in installs), dockerfile.name
    makefile = (ROOT / "Makefile").read_text()
    assert "-e '.[cpu,plot]'" in makefile  # make serve draws pictures


@pytest.mark.parametrize(
    "argv",
    [
        ["translate", "--model", "g2p-bahdanau", "word", "--plot", "word.png"],
        ["batch", "--model", "g2p-bahdanau", "--input", "in.jsonl", "--output", "out", "--plot-first", "1"],
    ],
    ids=["translate", "batch"],
)
def test_cli_says_when_the_plot_extra_is_missing(monkeypatch, capsys, argv):
    """Without matplotlib (the serving images) the CLI refuses before calling anything."""
    from attnserve.cli.main import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(argv) == 2
    assert "pip install 'attnserve[plot]'" in capsys.readouterr().err
