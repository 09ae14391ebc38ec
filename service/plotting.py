"""Attention pictures: a labelled heat map per matrix, a grid of heads, a caption's maps over its image.

Needs the `plot` extra (matplotlib). Labels are drawn with DejaVu Sans and fall back glyph by
glyph to Noto Sans CJK (Debian's fonts-noto-cjk, installed by `make system-deps`), so Korean,
Japanese, Cyrillic and accented tokens render. Figures are built without pyplot's global state.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

FONTS = ["DejaVu Sans", "Noto Sans CJK JP"]
CELL_INCHES = 0.32  # one token's row or column
MAP_ALPHA = 0.6  # opacity of the attention map over the image


def attention_figure(
    weights: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], title: str = ""
) -> Figure:
    """A heat map of one (rows, cols) attention matrix: rows = output tokens, columns = source tokens."""
    rows, cols = weights.shape
    fig = Figure(figsize=(max(cols * CELL_INCHES + 2.2, 3.5), max(rows * CELL_INCHES + 1.6, 2.5)))
    ax = fig.add_subplot()
    _heat_map(fig, ax, weights, row_labels, col_labels, title)
    fig.colorbar(ax.images[0], ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def heads_figure(matrices: Sequence[tuple[np.ndarray, Sequence[str], Sequence[str], str]]) -> Figure:
    """A grid of heat maps, one per (weights, row labels, column labels, title): a per-head mode."""
    n = len(matrices)
    columns = min(n, 4)
    grid_rows = -(-n // columns)
    rows, cols = matrices[0][0].shape
    panel_w, panel_h = max(cols * CELL_INCHES + 1.2, 2.5), max(rows * CELL_INCHES + 1.2, 2.2)
    fig = Figure(figsize=(columns * panel_w, grid_rows * panel_h))
    for i, (weights, row_labels, col_labels, title) in enumerate(matrices):
        _heat_map(fig, fig.add_subplot(grid_rows, columns, i + 1), weights, row_labels, col_labels, title)
    fig.tight_layout()
    return fig


def caption_figure(image: np.ndarray, maps: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """The image with each output word's attention map over it, one panel per word.

    Args:
        image: (H, W) or (H, W, 3) pixels in [0, 1], as the model saw them.
        maps: (words, grid_height, grid_width) attention weights.
        labels: the words.
        title: the figure's title (the caption, say).
    """
    n = len(labels)
    columns = min(n, 6)
    grid_rows = -(-n // columns)
    fig = Figure(figsize=(1.7 * columns, 1.8 * grid_rows + (0.4 if title else 0)))
    height, width = image.shape[:2]
    for i, (word, weights) in enumerate(zip(labels, maps, strict=True)):
        ax = fig.add_subplot(grid_rows, columns, i + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0))
        ax.imshow(weights, cmap="inferno", alpha=MAP_ALPHA, extent=(0, width, height, 0),
                  interpolation="bilinear")  # fmt: skip
        ax.set_title(word, fontfamily=FONTS, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontfamily=FONTS, fontsize=11)
    fig.tight_layout()
    return fig


def _heat_map(fig: Figure, ax, weights, row_labels, col_labels, title: str) -> None:
    """Draws one labelled matrix on an axes."""
    ax.imshow(weights, cmap="viridis", vmin=0, vmax=max(float(np.max(weights)), 1e-9), aspect="equal")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=90, fontfamily=FONTS)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontfamily=FONTS)
    ax.set_xlabel("source tokens")
    ax.set_ylabel("output tokens")
    if title:
        ax.set_title(title, fontfamily=FONTS, fontsize=10)


def image_pixels(data: bytes, height: int, width: int) -> np.ndarray:
    """Encoded image bytes as the model's input size in [0, 1] ((H, W) gray or (H, W, 3))."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if image.mode in ("L", "LA", "I", "1") else "RGB")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def response_figure(response, image: bytes | None = None) -> Figure:
    """The picture of a gRPC TranslateResponse or CaptionResponse returned with attention.

    Args:
        response: an attnserve.v1 TranslateResponse (cross attention or per-head matrices) or a
            CaptionResponse (attention maps).
        image: the captioned image's encoded bytes (CaptionResponse only).

    Raises:
        ValueError: if the response carries no attention, or a caption comes without its image.
    """
    if hasattr(response, "input_height"):  # CaptionResponse
        maps = response.attention
        if not maps.steps or image is None:
            raise ValueError("a caption's picture needs its attention maps and its image")
        weights = np.asarray(maps.weights, dtype=np.float32).reshape(
            maps.steps, maps.grid_height, maps.grid_width
        )
        pixels = image_pixels(image, response.input_height, response.input_width)
        return caption_figure(pixels, weights, list(maps.labels), response.text)
    if response.attention_heads:
        return heads_figure(
            [
                (_matrix(m), m.row_labels, m.col_labels, f"layer {m.layer} head {m.head}")
                for m in response.attention_heads
            ]
        )
    if not response.attention.rows:
        raise ValueError("the response carries no attention; ask for it")
    m = response.attention
    return attention_figure(_matrix(m), m.row_labels, m.col_labels, response.text)


def _matrix(matrix) -> np.ndarray:
    """(rows, cols) weights of an AttentionMatrix."""
    return np.asarray(matrix.weights, dtype=np.float32).reshape(matrix.rows, matrix.cols)


def save(fig: Figure, path: Path, dpi: int = 80, colors: int = 128) -> Path:
    """Writes a figure as a PNG with a palette of `colors` (a few times smaller); returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buffer).convert("RGB").quantize(colors).save(path, format="PNG", optimize=True)
    return path


def answer_figure(result, manifest, request) -> Figure:
    """The picture of a core Answer (cross attention) for its PreparedRequest.

    Raises:
        ValueError: if the result carries no cross attention.
    """
    if result.attention is None:
        raise ValueError("the result carries no cross attention")
    if manifest.image is None:
        return attention_figure(result.attention, result.output_tokens, result.source_tokens, result.text)
    spec = manifest.image
    pixels = request.image.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    pixels = pixels[..., 0] if spec.channels == 1 else pixels
    maps = result.attention.reshape(len(result.output_tokens), spec.grid_height, spec.grid_width)
    return caption_figure(pixels, maps, result.output_tokens, result.text)
