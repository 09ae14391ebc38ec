"""What clients send: scenes resized and re-encoded as the caption bench and training see them."""

import io

import numpy as np
import pytest
from PIL import Image

from attnserve.bench.caption_robustness import conditions, table
from attnserve.models.client_images import MAX_SIDE, MIN_SIDE, ClientEncoding, encode, random_encoding


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).random((56, 56)).astype(np.float32)


@pytest.mark.parametrize(
    "how",
    [ClientEncoding(), ClientEncoding(224, "lanczos", "JPEG", 70, "RGB"), ClientEncoding(28, "bilinear")],
)
def test_encode_writes_the_format_size_and_mode_asked_for(how):
    image = Image.open(io.BytesIO(encode(_pixels(), how)))
    assert image.format == how.format and image.mode == how.mode
    assert image.size == ((how.size, how.size) if how.size else (56, 56))


def test_native_png_keeps_every_pixel():
    pixels = np.round(_pixels() * 255) / 255
    decoded = np.asarray(Image.open(io.BytesIO(encode(pixels, ClientEncoding()))), np.float32) / 255
    assert np.abs(decoded - pixels).max() < 1e-6


def test_random_encodings_cover_what_users_send():
    rng = np.random.default_rng(0)
    drawn = [random_encoding(rng) for _ in range(400)]
    sizes = [d.size for d in drawn]
    assert MIN_SIDE <= min(sizes) < 40 and 300 < max(sizes) <= MAX_SIDE
    assert {d.format for d in drawn} == {"PNG", "JPEG"} and {d.mode for d in drawn} == {"L", "RGB"}
    assert {d.resample for d in drawn} == {"nearest", "bilinear", "bicubic", "lanczos"}
    assert all(70 <= d.quality <= 95 for d in drawn)


@pytest.mark.parametrize(
    "bad", [dict(resample="magic"), dict(format="GIF"), dict(mode="CMYK"), dict(quality=0), dict(size=-1)]
)
def test_bad_encodings_are_refused(bad):
    with pytest.raises(ValueError):
        ClientEncoding(**bad)


def test_the_bench_measures_the_issues_encodings_and_prints_one_line_each():
    labels = [c.label for c in conditions()]
    assert len(set(labels)) == len(labels)
    for wanted in ["native PNG L", "native PNG RGB", "224 JPEG q85 bicubic RGB", "112 PNG bilinear L",
                   "28 PNG lanczos L", "112 JPEG q70 lanczos RGB"]:  # fmt: skip
        assert wanted in labels
    rows = [{"encoding": e, "precision": p, "exact_match": 0.5, "localisation": 0.9}
            for e in ("a", "b") for p in ("fp32", "int8")]  # fmt: skip
    lines = table(rows).splitlines()
    assert len(lines) == 4 and lines[2] == "| a | 50.0% | 90.0% | 50.0% | 90.0% |"
