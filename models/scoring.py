"""Word and phoneme error rates for sequence predictions with several references (no torch)."""

from __future__ import annotations

from collections.abc import Sequence


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def error_rates(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
) -> dict[str, float]:
    """WER and PER of predictions against any of their references.

    A word is right if it equals any reference. PER is the total edit distance to each word's
    closest reference over the total length of those references.

    Returns:
        {"wer", "per", "words"}.

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
    return {"wer": wrong / len(predictions), "per": edits / ref_len, "words": float(len(predictions))}
