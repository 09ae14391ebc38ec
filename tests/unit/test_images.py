"""Untrusted image bytes: PNG and JPEG are decoded and resized; anything else is a clean INVALID_ARGUMENT."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_image
from attnserve.core.manifest import ImageSpec

SPEC = ImageSpec(height=56, width=56, channels=1, grid_height=7, grid_width=7)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _rejected(data: bytes, match: str) -> None:
    with pytest.raises(RequestError, match=match) as info:
        decode_image(data, SPEC)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(("size", "mode"), [((56, 56), "L"), ((300, 120), "RGB"), ((3, 7), "L")])
def test_png_and_jpeg_become_the_models_input(fmt, size, mode):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    pixels = decode_image(_encode(image, fmt), SPEC)
    assert pixels.shape == (1, 56, 56) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


def test_pixels_keep_their_values_and_layout():
    image = np.zeros((56, 56), dtype=np.uint8)
    image[:28, 28:] = 255  # a bright top-right quarter
    pixels = decode_image(_encode(Image.fromarray(image), "PNG"), SPEC)[0]
    assert pixels[:28, 28:].min() == 1.0 and pixels[28:, :].max() == 0.0 and pixels[:28, :28].max() == 0.0


def test_other_formats_and_garbage_are_refused():
    _rejected(b"", "empty")
    _rejected(_encode(Image.new("L", (8, 8)), "GIF"), "PNG, JPEG")
    _rejected(_encode(Image.new("RGB", (8, 8)), "BMP"), "PNG, JPEG")
    _rejected(b"not an image at all", "PNG, JPEG")
    _rejected(_encode(Image.new("L", (64, 64), 128), "PNG")[:60], "could not be decoded")


def test_too_many_bytes_are_refused_before_decoding():
    _rejected(b"\x89PNG" + bytes(MAX_IMAGE_BYTES), f"at most {MAX_IMAGE_BYTES}")


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header is rewritten to declare width x height pixels."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (2**20, 2**20), (20_000, 1)])
def test_decompression_bombs_are_refused_from_the_header(width, height):
    if width * height <= MAX_IMAGE_PIXELS:
        _rejected(_png_declaring(width, height), "could not be decoded")  # the data is not there
    else:
        _rejected(_png_declaring(width, height), "pixels")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_invalid_argument(data):
    try:
        pixels = decode_image(data, SPEC)
    except RequestError as e:
        assert e.code is ErrorCode.INVALID_ARGUMENT
    else:
        assert pixels.shape == (1, 56, 56)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=8, max_value=200))
def test_corrupted_png_bodies_are_invalid_argument(noise, cut):
    data = bytearray(_encode(Image.new("L", (32, 32), 77), "PNG"))
    data[cut : cut + len(noise)] = noise
    try:
        decode_image(bytes(data), SPEC)
    except RequestError as e:
        assert e.code is ErrorCode.INVALID_ARGUMENT
