"""Every bundled model over the real service: dates with locales, captions with attention maps.

Runs before test_grpc_service.py, whose last test stops the shared service.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from attnserve.core.manifest import discover
from attnserve.core.requests import AttentionMode
from attnserve.models import dates_data, scenes_data
from attnserve.service.client import Client, attention_array, attention_maps
from attnserve.v1 import translator_pb2 as pb
from tests.conftest import BUNDLED_REPOSITORY, BYOM_IMAGES
from tests.helpers import answers
from tests.integration.conftest import BYOM_IMAGE_MODEL, BYOM_MODEL, served_translator

pytestmark = pytest.mark.integration
MANIFESTS = {m.name: m for m in discover(BUNDLED_REPOSITORY)}
DATES, CAPTION, EN_FR = "dates-luong", "caption-fashion", "en-fr-transformer"


@pytest.fixture(scope="module")
def client(service):
    with Client(service.grpc_address, timeout_s=60) as c:
        yield c


def _png(scene: scenes_data.Scene, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((scene.image * 255).round().astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _status(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_list_models_describes_every_served_model(client, served_repository):
    served = {m.name: m for m in discover(served_repository)}
    listed = {m.name: m for m in client.list_models().models}
    assert listed.keys() == served.keys() == {*MANIFESTS, BYOM_MODEL, BYOM_IMAGE_MODEL}
    for name, info in listed.items():
        manifest = served[name]
        assert (info.version, info.task, info.architecture) == (
            manifest.version, manifest.task, manifest.architecture,
        )  # fmt: skip
        assert info.rpc == ("Caption" if manifest.image else "Translate")
        assert info.reads_locale == manifest.reads_locale and info.description == manifest.description
        assert dict(info.metrics) == pytest.approx(manifest.metrics["test"])
        assert pb.ATTENTION_MODE_CROSS in info.attention_modes


def test_dates_in_many_locales_match_the_runtime_and_mostly_the_truth(client):
    manifest = MANIFESTS[DATES]
    local = served_translator(manifest)
    examples = dates_data.sample("test", 24, seed=7)
    right = 0
    for e in examples:
        got = client.translate(DATES, e.text, locale=e.locale, attention=True)
        want = answers(local, [local.codec.prepare(e.text, AttentionMode.CROSS, locale=e.locale)])[0]
        assert got.text == want.text and got.source_tokens[0] == f"<locale:{e.locale}>"
        assert (got.attention.rows, got.attention.cols) == (len(got.output_tokens), len(e.text) + 1)
        right += got.text == e.iso
    assert right >= 20, f"{right}/24 dates right"  # far below its test figure: only a broken model fails


def test_a_locale_the_model_never_saw_is_read_as_unknown(client):
    got = client.translate(DATES, "7 March 2024", locale="xx_NOWHERE")
    assert got.source_tokens[0] == "<locale:?>" and len(got.text) == 10


def test_caption_matches_the_runtime_and_returns_one_map_per_word(client):
    manifest = MANIFESTS[CAPTION]
    local = served_translator(manifest)
    scenes = scenes_data.generate("test", 6, seed=11)
    for scene in scenes:
        got = client.caption(CAPTION, _png(scene), attention=True)
        prepared = local.codec.prepare_image(_png(scene), AttentionMode.CROSS)
        want = answers(local, [prepared])[0]
        assert tuple(got.output_tokens) == want.output_tokens and got.text == " ".join(want.output_tokens)
        maps = attention_maps(got.attention)
        assert maps.shape == (len(got.output_tokens), manifest.image.grid_height, manifest.image.grid_width)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
        assert list(got.attention.labels) == list(got.output_tokens)
        assert (got.input_height, got.input_width) == (manifest.image.height, manifest.image.width)


def test_caption_accepts_jpeg_and_beam_search(client):
    scene = scenes_data.generate("test", 1, seed=3)[0]
    got = client.caption(CAPTION, _png(scene, "JPEG"), beam_size=4)
    assert got.text and not got.HasField("attention")


def test_caption_scores_and_what_only_translate_answers(client):
    scene = scenes_data.generate("test", 1, seed=5)[0]
    got = client.caption(CAPTION, _png(scene), scores=True)
    assert len(got.token_logprobs) == len(got.output_tokens) and got.score <= 0
    nbest = pb.TranslateOptions(num_hypotheses=2)
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Caption(pb.CaptionRequest(model=CAPTION, image=_png(scene), options=nbest), timeout=60)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Translate options" in info.value.details()


def test_subword_model_streams_text_and_aligns_words(client):
    chunks = list(client.translate_stream(EN_FR, "backup tool", alignment=pb.ALIGNMENT_MODE_HARD))
    response = chunks[-1].response
    assert "".join(c.text for c in chunks[:-1]) == response.text and "\u2581" not in response.text
    words = [tuple(map(int, pair.split("-"))) for pair in response.word_alignment.split()]
    assert {t for _, t in words} == set(range(len(response.text.split())))
    assert all(s in (0, 1) for s, _ in words)  # two source words


def test_caption_rejects_what_is_not_a_usable_image(client):
    scene = scenes_data.generate("test", 1, seed=5)[0]
    cases = {
        b"": "empty",
        b"GIF89a not really": "PNG, JPEG",
        _png(scene)[:50]: "could not be decoded",
    }
    for data, message in cases.items():
        error = _status(lambda data=data: client.caption(CAPTION, data))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    error = _status(lambda: client.caption("g2p-bahdanau", _png(scene)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "call Translate" in error.details()
    error = _status(lambda: client.translate(CAPTION, "a bag"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "call Caption" in error.details()
    error = _status(lambda: client.caption("no-such-model", _png(scene)))
    assert error.code() is grpc.StatusCode.NOT_FOUND and CAPTION in error.details()


def test_cli_caption_prints_the_caption_and_the_maps(service, tmp_path):
    scene = scenes_data.generate("test", 1, seed=9)[0]
    image = tmp_path / "scene.png"
    image.write_bytes(_png(scene))
    exe = str(Path(sys.executable).with_name("attnserve"))
    out = subprocess.run(
        [exe, "caption", "--target", service.grpc_address, "--model", CAPTION, str(image), "--attention"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    caption = out.splitlines()[0].split()
    assert caption and out.count("*") == len(caption)  # one marked peak per word


def test_transformer_attention_per_layer_and_head_and_self_attention(client):
    config = MANIFESTS["g2p-transformer"].raw["model_config"]
    for mode, layers in (
        (pb.ATTENTION_MODE_CROSS_HEADS, config["decoder_layers"]),
        (pb.ATTENTION_MODE_DECODER_SELF, config["decoder_layers"]),
        (pb.ATTENTION_MODE_ENCODER_SELF, config["encoder_layers"]),
    ):
        request = pb.TranslateRequest(
            model="g2p-transformer", text="serving", options=pb.TranslateOptions(attention=mode)
        )
        got = client.stub.Translate(request, timeout=60)
        assert not got.HasField("attention") and len(got.attention_heads) == layers * config["heads"]
        for matrix in got.attention_heads:
            assert matrix.mode == mode and matrix.rows == len(matrix.row_labels)
            weights = np.asarray(matrix.weights).reshape(matrix.rows, matrix.cols)
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-4)
    heads = pb.TranslateOptions(attention=pb.ATTENTION_MODE_CROSS_HEADS)
    request = pb.TranslateRequest(model="g2p-bahdanau", text="cat", options=heads)
    error = _status(lambda: client.stub.Translate(request, timeout=60))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "cross_heads" in error.details()


def test_chosen_layers_and_heads_come_back_reduced_and_a_missing_layer_is_refused(client):
    def ask(**selection):
        options = pb.TranslateOptions(attention=pb.ATTENTION_MODE_CROSS_HEADS, **selection)
        request = pb.TranslateRequest(model=EN_FR, text="backup tool", options=options)
        return client.stub.Translate(request, timeout=60).attention_heads

    full = {(m.layer, m.head): attention_array(m) for m in ask()}
    (mean,) = ask(layers=[2], heads=[3, 1], reduction=pb.ATTENTION_REDUCTION_MEAN)
    assert (mean.layer, mean.reduction) == (2, pb.ATTENTION_REDUCTION_MEAN)
    np.testing.assert_allclose(attention_array(mean), (full[2, 3] + full[2, 1]) / 2, atol=1e-5)
    assert [(m.layer, m.head) for m in ask(heads=[2])] == [(0, 2), (1, 2), (2, 2)]
    bad = pb.TranslateOptions(attention=pb.ATTENTION_MODE_CROSS_HEADS, layers=[9])
    error = _status(lambda: client.stub.Translate(pb.TranslateRequest(model=EN_FR, text="x", options=bad)))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "no layer 9" in error.details()


def test_a_model_brought_by_a_user_is_served_beside_the_bundled_ones(client, served_repository):
    (manifest,) = [m for m in discover(served_repository) if m.name == BYOM_MODEL]
    got = client.translate(BYOM_MODEL, "German", attention=True)
    assert (got.model, got.model_version) == (BYOM_MODEL, "1") and manifest.task == "parallel-text"
    assert list(got.source_tokens) == list("German") and got.attention.cols == len("German")
    assert set(got.output_tokens) <= set(manifest.target_vocab.tokens[3:])
    error = _status(lambda: client.translate(BYOM_MODEL, "x" * 500))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "at most" in error.details()


def test_images_and_captions_brought_by_a_user_are_served_by_caption(client, served_repository):
    (manifest,) = [m for m in discover(served_repository) if m.name == BYOM_IMAGE_MODEL]
    image = BYOM_IMAGES.parent / "images" / "scene-000.png"
    got = client.caption(BYOM_IMAGE_MODEL, image.read_bytes(), attention=True)
    assert manifest.task == "image-captions" and manifest.image.channels == 3
    assert set(got.output_tokens) <= set(manifest.target_vocab.tokens[3:])
    maps = attention_maps(got.attention)
    assert maps.shape == (len(got.output_tokens), manifest.image.grid_height, manifest.image.grid_width)
    error = _status(lambda: client.translate(BYOM_IMAGE_MODEL, "a bag"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "call Caption" in error.details()


def test_english_to_french_reads_subwords_and_answers_as_the_runtime_does(client):
    manifest = MANIFESTS[EN_FR]
    local = served_translator(manifest)
    texts = ["development files for the GNU C library", "Python 3 bindings for libfoo 🙂"]
    for text in texts:
        got = client.translate(EN_FR, text, attention=True)
        want = answers(local, [local.codec.prepare(text, AttentionMode.CROSS)])[0]
        assert got.text == want.text and tuple(got.source_tokens) == local.codec.subwords.encode(text)
        assert (got.attention.rows, got.attention.cols) == (len(got.output_tokens), len(got.source_tokens))
    got = client.translate(EN_FR, texts[0], beam_size=4)
    assert got.text and "▁" not in got.text
