"""What a client sends instead of a 56 px scene: the picture resized, in grey or RGB, as PNG or JPEG.

Used by the caption robustness bench (fixed encodings) and by caption training (random ones), so
that both see the bytes a user's tool would write. No torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
FORMATS = ("PNG", "JPEG")
MODES = ("L", "RGB")
MIN_SIDE, MAX_SIDE = 28, 448  # the sides a random encoding is drawn from (log-uniform)
MIN_QUALITY, MAX_QUALITY = 70, 95  # the JPEG qualities a random encoding is drawn from


@dataclass(frozen=True)
class ClientEncoding:
    """How a client turns a picture into bytes: side in pixels (0 keeps the size), resampling
    method, file format, JPEG quality and colour mode."""

    size: int = 0
    resample: str = "bicubic"
    format: str = "PNG"
    quality: int = 85  # JPEG only
    mode: str = "L"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLERS:
            raise ValueError(f"resample must be one of {sorted(RESAMPLERS)}, got {self.resample!r}")
        if self.format not in FORMATS or self.mode not in MODES:
            raise ValueError(f"format must be one of {FORMATS} and mode one of {MODES}")
        if self.size < 0 or not 1 <= self.quality <= 100:
            raise ValueError(f"need size >= 0 and 1 <= quality <= 100, got {self.size}, {self.quality}")

    @property
    def label(self) -> str:
        """A short name, e.g. "224 JPEG q85 bicubic RGB"."""
        fmt = f"JPEG q{self.quality}" if self.format == "JPEG" else "PNG"
        return f"{self.size or 'native'} {fmt} {self.resample if self.size else ''} {self.mode}".replace(
            "  ", " "
        )


def encode(pixels: np.ndarray, how: ClientEncoding) -> bytes:
    """The bytes a client would send for a grey picture.

    Args:
        pixels: (H, W) float in [0, 1].
        how: the encoding.

    Returns:
        A PNG or JPEG file.
    """
    image = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "L")
    if how.size and image.size != (how.size, how.size):
        image = image.resize((how.size, how.size), RESAMPLERS[how.resample])
    if how.mode != "L":
        image = image.convert(how.mode)
    buffer = io.BytesIO()
    if how.format == "JPEG":
        image.save(buffer, format="JPEG", quality=how.quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)  # the level changes time, not pixels
    return buffer.getvalue()


def random_encoding(rng: np.random.Generator) -> ClientEncoding:
    """A random client: side log-uniform in 28..448, any upscaling method, PNG or JPEG q70..95
    (one each half of the time), grey or RGB (likewise)."""
    size = round(float(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE)))))
    methods = ("bilinear", "bicubic", "lanczos", "nearest")
    return ClientEncoding(
        size=size,
        resample=methods[int(rng.integers(len(methods)))],
        format=FORMATS[int(rng.integers(2))],
        quality=int(rng.integers(MIN_QUALITY, MAX_QUALITY + 1)),
        mode=MODES[int(rng.integers(2))],
    )
