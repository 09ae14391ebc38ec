"""What each kind of bundled model accepts: locale-tagged dates, images, and the wrong rpc."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from attnserve.core.codec import SourceCodec
from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.manifest import discover
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from tests.conftest import BUNDLED_REPOSITORY
from tests.helpers import answers

MANIFESTS = {m.name: m for m in discover(BUNDLED_REPOSITORY)}


@pytest.fixture(scope="module")
def dates():
    return SourceCodec(MANIFESTS["dates-luong"])


def test_dates_get_their_locale_token_or_the_unknown_one(dates):
    assert dates.prepare("7. März 2024", AttentionMode.NONE, locale="de_DE").source_tokens[:2] == (
        "<locale:de_DE>", "7",
    )  # fmt: skip
    for locale in ("", "xx_YY", "<locale:de_DE>", "de_DE>"):
        assert (
            dates.prepare("7 March 2024", AttentionMode.NONE, locale=locale).source_tokens[0] == "<locale:?>"
        )
    with pytest.raises(RequestError, match="characters are listed in its manifest"):
        dates.prepare("7 March 2024 \U0001f600", AttentionMode.NONE, locale="en_GB")


def test_text_models_refuse_images(dates):
    with pytest.raises(RequestError, match="call Translate") as info:
        dates.prepare_image(b"\x89PNG", AttentionMode.NONE)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def captioner():
    return ModelRunner(MANIFESTS["caption-fashion"])


def test_image_models_refuse_text(captioner):
    with pytest.raises(RequestError, match="call Caption"):
        captioner.codec.prepare("a bag", AttentionMode.NONE)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_of_any_size_are_captioned_and_one_bad_image_fails_alone(captioner):
    rng = np.random.default_rng(1)
    images = [_png(rng.integers(0, 256, size, dtype=np.uint8)) for size in ((56, 56), (200, 90), (10, 10))]
    good = [captioner.codec.prepare_image(image, AttentionMode.CROSS) for image in images]
    bad = dataclasses.replace(good[0], image=np.zeros((3, 5, 5), np.float32))  # not the model's input shape
    results = answers(captioner, [good[0], bad, good[1], good[2]])
    assert isinstance(results[1], RequestError) and results[1].code is ErrorCode.INTERNAL
    grid = MANIFESTS["caption-fashion"].image
    for result in (results[0], results[2], results[3]):
        assert result.attention.shape == (len(result.output_tokens), grid.grid_height * grid.grid_width)
