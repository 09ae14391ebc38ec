"""What each kind of bundled model accepts: locale-tagged dates, images, and the wrong rpc."""

import pytest

from attnserve.service.errors import ErrorCode, RequestError
from attnserve.service.manifest import discover
from attnserve.service.translation import AttentionMode, SourceCodec
from tests.conftest import BUNDLED_REPOSITORY

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
