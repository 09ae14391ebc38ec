"""Every bundled model over the real service: dates with locales, captions with attention maps.

Runs before test_grpc_service.py, whose last test stops the shared service.
"""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from attnserve.models import dates_data, scenes_data
from attnserve.service.client import Client
from attnserve.service.manifest import discover
from attnserve.service.translation import AttentionMode, Translator
from attnserve.v1 import translator_pb2 as pb
from tests.conftest import BUNDLED_REPOSITORY
from tests.integration.conftest import BYOM_MODEL

pytestmark = pytest.mark.integration
MANIFESTS = {m.name: m for m in discover(BUNDLED_REPOSITORY)}
DATES, CAPTION = "dates-luong", "caption-fashion"


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
    assert listed.keys() == served.keys() == {*MANIFESTS, BYOM_MODEL}
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
    local = Translator(manifest)
    examples = dates_data.sample("test", 24, seed=7)
    right = 0
    for e in examples:
        got = client.translate(DATES, e.text, locale=e.locale, attention=True)
        want = local.translate_batch([local.codec.prepare(e.text, AttentionMode.CROSS, locale=e.locale)])[0]
        assert got.text == want.text and got.source_tokens[0] == f"<locale:{e.locale}>"
        assert (got.attention.rows, got.attention.cols) == (len(got.output_tokens), len(e.text) + 1)
        right += got.text == e.iso
    assert right >= 20, f"{right}/24 dates right"  # far below its test figure: only a broken model fails


def test_a_locale_the_model_never_saw_is_read_as_unknown(client):
    got = client.translate(DATES, "7 March 2024", locale="xx_NOWHERE")
    assert got.source_tokens[0] == "<locale:?>" and len(got.text) == 10


def test_a_model_brought_by_a_user_is_served_beside_the_bundled_ones(client, served_repository):
    (manifest,) = [m for m in discover(served_repository) if m.name == BYOM_MODEL]
    got = client.translate(BYOM_MODEL, "German", attention=True)
    assert (got.model, got.model_version) == (BYOM_MODEL, "1") and manifest.task == "parallel-text"
    assert list(got.source_tokens) == list("German") and got.attention.cols == len("German")
    assert set(got.output_tokens) <= set(manifest.target_vocab.tokens[3:])
    error = _status(lambda: client.translate(BYOM_MODEL, "x" * 500))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "at most" in error.details()
