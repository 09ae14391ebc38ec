"""What the encoder reads for a batch of rows: padded token ids and masks, or images."""

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

    @classmethod
    def from_ids(cls, sources: list[list[int]]) -> SourceBatch:
        """Text: padded `src_ids` (B, S) and `src_mask` (B, S) from one id list per row."""
        ids, mask = pad_batch(sources)
        return cls({"src_ids": ids, "src_mask": mask}, mask.sum(axis=1))

    @classmethod
    def from_images(cls, images: np.ndarray) -> SourceBatch:
        """Images (B, C, H, W) float32, attended over every cell of the encoder's feature grid."""
        return cls({"images": images})
