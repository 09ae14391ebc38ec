"""Turns untrusted image bytes into a model's input, refusing what is not a small PNG or JPEG."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from attnserve.core.errors import invalid
from attnserve.core.manifest import ImageSpec

MAX_IMAGE_BYTES = 4 * 2**20
MAX_IMAGE_PIXELS = 16 * 2**20  # checked from the header, before any pixel is decoded
FORMATS = ("PNG", "JPEG")


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decodes, converts and resizes an image to the model's input.

    Args:
        data: the encoded image as sent by the client.
        spec: the model's input size and channels.

    Returns:
        (channels, height, width) float32 pixels in [0, 1].

    Raises:
        RequestError: INVALID_ARGUMENT if the bytes are empty, too many, not a PNG or JPEG,
            declare too many pixels (decompression bombs) or are truncated.
    """
    if not data:
        raise invalid("image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise invalid(f"image is {len(data)} bytes; at most {MAX_IMAGE_BYTES} are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise invalid(
                    f"image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted"
                )
            image.load()
    except UnidentifiedImageError:
        raise invalid(f"not an image this service reads; send one of {', '.join(FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(f"image declares too many pixels; at most {MAX_IMAGE_PIXELS} are accepted") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise invalid(f"image could not be decoded ({type(e).__name__})") from None
    mode = "L" if spec.channels == 1 else "RGB"
    resized = image.convert(mode).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return pixels[None] if spec.channels == 1 else pixels.transpose(2, 0, 1)
