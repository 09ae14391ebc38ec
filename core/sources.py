"""What the encoder reads for a batch of rows: padded token ids and masks, or images; and how
rows of different lengths are grouped so that the encoder pays for little padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pads id lists into (B, S) int64 ids and a (B, S) bool mask."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    return ids, ids != pad_id


@dataclass(frozen=True)
class SourceBatch:
    """Encoder inputs for B rows and, per row, how many attention columns are real (B,);
    lengths None means every column is (images attended over a whole feature grid)."""

    inputs: dict[str, np.ndarray]
    lengths: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return len(next(iter(self.inputs.values())))

    def columns(self, row: int) -> slice:
        """The real attention columns of a row."""
        return slice(None) if self.lengths is None else slice(0, int(self.lengths[row]))

    def take(self, rows: np.ndarray) -> SourceBatch:
        """The given rows alone, text cut to the longest of them (images as they are)."""
        if self.lengths is None:
            return SourceBatch({k: v[rows] for k, v in self.inputs.items()})
        lengths = self.lengths[rows]
        width = int(lengths.max())
        return SourceBatch({k: v[rows, :width] for k, v in self.inputs.items()}, lengths)

    @classmethod
    def from_ids(cls, sources: list[list[int]]) -> SourceBatch:
        """Text: padded `src_ids` (B, S) and `src_mask` (B, S) from one id list per row."""
        ids, mask = pad_batch(sources)
        return cls({"src_ids": ids, "src_mask": mask}, mask.sum(axis=1))

    @classmethod
    def from_images(cls, images: np.ndarray) -> SourceBatch:
        """Images (B, C, H, W) float32, attended over every cell of the encoder's feature grid."""
        return cls({"images": images})


def length_groups(lengths: np.ndarray, call_tokens: float) -> list[np.ndarray]:
    """Splits rows into encoder calls that cost the least padding, by length.

    An encoder call of r rows padded to length l costs `call_tokens + r * l` token-equivalents;
    rows sorted by length are cut where that total is smallest (exact, by dynamic programming).

    Args:
        lengths: (B,) real tokens of each row.
        call_tokens: the fixed cost of one encoder call, in tokens (0 gives one call per length).

    Returns:
        Row indices of each call, shortest rows first; together they hold every row once.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = np.asarray(lengths)[order].astype(np.float64)  # (B,)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: least cost of the first j sorted rows
    cut = np.zeros(n + 1, dtype=np.int64)  # where the last call of best[j] starts
    for j in range(1, n + 1):
        starts = np.arange(j)  # the last call holds sorted rows start .. j - 1
        costs = best[:j] + call_tokens + (j - starts) * sorted_lengths[j - 1]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups, j = [], n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]
