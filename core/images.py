"""Turns untrusted image bytes into a model's input, refusing what is not a small PNG or JPEG.

Whatever a client sends (any size, grey, RGB, CMYK, palette, 16-bit, with transparency, a
phone photo with an EXIF orientation) is read as the picture a viewer would show: turned upright,
made opaque over black (the background the bundled scenes are drawn on), converted to the model's
channels and resized to its grid. Shrinking averages the source pixels each target pixel covers
(area resampling), so a picture enlarged by any method and shrunk back comes back close to what
it was; enlarging is bicubic. Training may pass its images through `decode_image` too, so that a
model sees exactly what the service gives it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from attnserve.core.errors import invalid
from attnserve.core.manifest import ImageSpec

MAX_IMAGE_BYTES = 4 * 2**20
MAX_IMAGE_PIXELS = 16 * 2**20  # checked from the header, before any pixel is decoded
FORMATS = ("PNG", "JPEG")
SHRINK = Image.Resampling.BOX  # area: each target pixel is the mean of the source pixels it covers
ENLARGE = Image.Resampling.BICUBIC
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16-bit PNGs open as one of these


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
            warnings.simplefilter("ignore", UserWarning)  # corrupt EXIF: the picture is kept as stored
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise invalid(
                    f"image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _opaque(_eight_bit(image)).convert("L" if spec.channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise invalid(f"not an image this service reads; send one of {', '.join(FORMATS)}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise invalid(f"image declares too many pixels; at most {MAX_IMAGE_PIXELS} are accepted") from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as e:  # corrupt data or EXIF
        raise invalid(f"image could not be decoded ({type(e).__name__})") from None
    resized = resize(image, spec.width, spec.height)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    return pixels[None] if spec.channels == 1 else pixels.transpose(2, 0, 1)


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image at width x height: each axis shrunk by area resampling or enlarged bicubically."""
    if image.width != width:
        image = image.resize((width, image.height), SHRINK if image.width > width else ENLARGE)
    if image.height != height:
        image = image.resize((width, height), SHRINK if image.height > height else ENLARGE)
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grey image scaled to 8 bits (PIL's own conversion clips at 255)."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    full = 1.0 if image.mode == "F" else 65535.0  # PNG stores at most 16 bits per sample
    return Image.fromarray(np.clip(np.round(values * 255.0 / full), 0, 255).astype(np.uint8), "L")


def _opaque(image: Image.Image) -> Image.Image:
    """The image with any transparency (alpha, a palette's or a tRNS colour) laid over black."""
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
