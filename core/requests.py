"""What a request to the core is and what it answers: the types every room above the core shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from attnserve.core.alignment import DEFAULT_THRESHOLD, AlignmentMode
from attnserve.core.head_selection import ALL_HEADS, HeadSelection, Reduction


@dataclass(frozen=True)
class StreamToken:
    """One output token as a stream sees it: the token, the text it adds to the output, and its
    attention row and log-probability when the request asked for them."""

    token: str
    text: str
    attention: np.ndarray | None = None
    logprob: float | None = None


StreamCallback = Callable[[StreamToken], None]


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
    scores: bool = False  # return the score and each token's log-probability
    num_hypotheses: int = 1  # n-best: beam hypotheses to return, best first
    alignment: AlignmentMode = AlignmentMode.NONE
    alignment_threshold: float = DEFAULT_THRESHOLD  # SOFT alignment's least weight
    selection: HeadSelection = ALL_HEADS  # layers and heads of a per-head attention mode


@dataclass(frozen=True)
class HeadAttention:
    """One layer and head of a per-head attention mode, with the labels of its rows and columns."""

    mode: AttentionMode
    layer: int
    head: int
    weights: np.ndarray  # (rows, cols)
    row_labels: tuple[str, ...]
    col_labels: tuple[str, ...]
    reduction: Reduction = Reduction.NONE  # the layer's selected heads reduced into one (head 0)


@dataclass(frozen=True)
class Scores:
    """Log-probabilities of an output: each token's, their sum with that of end-of-sequence when the
    output ended with it, and (with a length penalty) the length-normalised sum."""

    score: float
    token_logprobs: tuple[float, ...]
    normalized_score: float | None = None


@dataclass(frozen=True)
class Candidate:
    """One hypothesis of an n-best list. attention: (output tokens, source tokens) or None."""

    output_tokens: tuple[str, ...]
    text: str
    scores: Scores
    attention: np.ndarray | None


@dataclass(frozen=True)
class Answer:
    """What one request (text or image) decodes to. attention: (output tokens, source tokens) or None.

    scores is set when asked for; hypotheses (best first, the first being this answer) when more
    than one was asked for; alignments are Pharaoh text, empty when not asked for.
    """

    output_tokens: tuple[str, ...]
    text: str
    source_tokens: tuple[str, ...]
    attention: np.ndarray | None
    batch_size: int
    heads: tuple[HeadAttention, ...] = ()
    scores: Scores | None = None
    hypotheses: tuple[Candidate, ...] = ()
    alignment: str = ""
    word_alignment: str = ""
