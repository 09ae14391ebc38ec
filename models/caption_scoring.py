"""Caption scores: exact match, and whether attention looks at the item a word names (no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnserve.models.scenes_data import Scene


def exact_match(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predicted token sequences equal to their reference, token for token.

    Raises:
        ValueError: if the two lists differ in length or are empty.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-empty lists; got {len(predictions)} and {len(references)}")
    right = sum(tuple(p) == tuple(r) for p, r in zip(predictions, references, strict=True))
    return right / len(predictions)


def grid_cell_centre(cell: int, grid_shape: tuple[int, int], canvas_shape: tuple[int, int]):
    """Pixel (row, col) of the centre of a row-major grid cell laid evenly over the canvas."""
    H, W = grid_shape
    r, c = divmod(int(cell), W)
    return (r + 0.5) * canvas_shape[0] / H, (c + 0.5) * canvas_shape[1] / W


def attention_localisation(
    scenes: Sequence[Scene],
    predictions: Sequence[Sequence[str]],
    attentions: Sequence[np.ndarray],
    grid_shape: tuple[int, int],
) -> float:
    """Fraction of class-name words, in exactly right captions, whose attention peak lies on their item.

    Counted: every class-name token (both tokens of "ankle boot") of every item, in scenes whose
    predicted caption equals the reference exactly (other scenes count nothing). Row t of a
    scene's attention map is the attention of the decoder step that emitted token t. The token is
    a hit if the centre, in canvas pixels, of the grid cell with the largest weight in row t lies
    inside the item's box (row0 <= y < row1, col0 <= x < col1); ties go to the first cell.

    Args:
        scenes: the reference scenes.
        predictions: the predicted tokens per scene (without </s>).
        attentions: per scene an array (T, N) with T >= len(prediction), N = H * W, row-major.
        grid_shape: (H, W) of the attention grid.

    Returns:
        hits / counted tokens; 0.0 if no token is counted (no caption exactly right).

    Raises:
        ValueError: if the lists differ in length or a map has too few rows or the wrong width.
    """
    if not len(scenes) == len(predictions) == len(attentions):
        raise ValueError(
            f"need equal lists; got {len(scenes)} scenes, {len(predictions)} predictions, "
            f"{len(attentions)} attention maps"
        )
    hits = counted = 0
    for scene, pred, attention in zip(scenes, predictions, attentions, strict=True):
        attention = np.asarray(attention)
        if attention.ndim != 2 or attention.shape[0] < len(pred) or attention.shape[1] != np.prod(grid_shape):
            raise ValueError(
                f"attention {attention.shape} does not fit {len(pred)} tokens on grid {grid_shape}"
            )
        if tuple(pred) != scene.caption:
            continue
        for item in scene.items:
            row0, col0, row1, col1 = item.box
            for t in item.name_tokens:
                y, x = grid_cell_centre(int(np.argmax(attention[t])), grid_shape, scene.image.shape)
                hits += row0 <= y < row1 and col0 <= x < col1
                counted += 1
    return hits / counted if counted else 0.0
