"""How far output token sequences are from their references (no torch).

Counts wrong sequences and token edits against the closest of several references, under
task-neutral names; each task records them under its own metric names (G2P: wer and per).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@dataclass(frozen=True)
class SequenceErrors:
    """Errors of predicted sequences against their references."""

    sequence_error_rate: float  # share of predictions equal to none of their references
    token_error_rate: float  # edits to each prediction's closest reference / those references' length
    sequences: int  # how many predictions were scored


def sequence_errors(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> SequenceErrors:
    """Sequence and token error rates of predictions against any of their references.

    A prediction is right if it equals any reference. The token error rate is the total edit
    distance to each prediction's closest reference over the total length of those references.

    Raises:
        ValueError: if the two lists differ in length or are empty.
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-empty lists; got {len(predictions)} and {len(references)}")
    wrong = edits = ref_len = 0
    for pred, refs in zip(predictions, references, strict=True):
        dist, ref = min((edit_distance(pred, r), tuple(r)) for r in refs)
        wrong += dist > 0
        edits += dist
        ref_len += len(ref)
    return SequenceErrors(wrong / len(predictions), edits / ref_len, len(predictions))
