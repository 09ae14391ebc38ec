"""Alignments of output tokens with source tokens, read from cross attention, in Pharaoh form.

A link (s, t) says output token t aligns with source token s; Pharaoh writes the links as
"s-t" pairs, 0-based, sorted by output then source index. For SentencePiece models, pieces are
merged into words (a word starts at a piece beginning with "▁") and the links follow them.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

WORD_START = "\u2581"  # SentencePiece's word-boundary mark
DEFAULT_THRESHOLD = 0.2


class AlignmentMode(Enum):
    """Which alignment a request wants back."""

    NONE = "none"
    HARD = "hard"  # each output token with its most-attended source token
    SOFT = "soft"  # each output token with every source token at or above a threshold


Links = list[tuple[int, int]]  # (source index, output index)


def links(attention: np.ndarray, mode: AlignmentMode, threshold: float = DEFAULT_THRESHOLD) -> Links:
    """The links of a (outputs, sources) attention matrix, sorted by output then source.

    Args:
        attention: (T, S) weights, each row a distribution over the source tokens.
        mode: HARD (argmax per row) or SOFT (weights >= threshold); NONE gives no links.
        threshold: SOFT's least weight of a link.
    """
    if mode is AlignmentMode.NONE or attention.size == 0:
        return []
    if mode is AlignmentMode.HARD:
        return [(int(s), t) for t, s in enumerate(attention.argmax(axis=1))]
    outputs, sources = np.nonzero(attention >= threshold)  # row-major: by output, then source
    return list(zip(sources.tolist(), outputs.tolist(), strict=True))


def word_indexes(pieces: tuple[str, ...] | list[str]) -> list[int]:
    """The word each SentencePiece piece belongs to (a new word at every piece starting with "▁")."""
    words, current = [], -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece.startswith(WORD_START):
            current += 1
        words.append(current)
    return words


def word_links(token_links: Links, source_pieces, output_pieces) -> Links:
    """Token links merged onto words: one link per pair of words with a link between their pieces."""
    src, out = word_indexes(source_pieces), word_indexes(output_pieces)
    merged = {(src[s], out[t]) for s, t in token_links}
    return sorted(merged, key=lambda link: (link[1], link[0]))


def pharaoh(pairs: Links) -> str:
    """Links as Pharaoh text: "s-t" pairs separated by spaces."""
    return " ".join(f"{s}-{t}" for s, t in pairs)
