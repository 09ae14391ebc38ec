"""What a request to the core is and what it answers: the types every room above the core shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

StreamCallback = Callable[[str, np.ndarray | None], None]  # output token, its attention row or None


class AttentionMode(Enum):
    """Which attention weights a request wants back."""

    NONE = "none"
    CROSS = "cross"
    CROSS_HEADS = "cross_heads"
    ENCODER_SELF = "encoder_self"
    DECODER_SELF = "decoder_self"


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, ready to join a batch."""

    source_tokens: tuple[str, ...]
    source_ids: tuple[int, ...]
    max_output_tokens: int
    attention: AttentionMode
    beam_size: int = 1
    length_penalty: float = 0.0
    image: np.ndarray | None = None  # (C, H, W) pixels for image models


@dataclass(frozen=True)
class HeadAttention:
    """One layer and head of a per-head attention mode, with the labels of its rows and columns."""

    mode: AttentionMode
    layer: int
    head: int
    weights: np.ndarray  # (rows, cols)
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """What one request (text or image) decodes to. attention: (output tokens, source tokens) or None."""

    output_tokens: tuple[str, ...]
    text: str
    source_tokens: tuple[str, ...]
    attention: np.ndarray | None
    batch_size: int
    heads: tuple[HeadAttention, ...] = ()
