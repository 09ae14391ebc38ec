"""Greedy decoding over any encoder + single-step decoder (plain numpy; knows nothing of Ray).

A `StepModel` exposes `encode()` and `step()`. The decoder state is a dict of arrays whose first
axis is the batch, so the loop can drop finished rows after every step and keep decoding only
the rows still running. The same loop drives ONNX Runtime (serving, evaluation) and PyTorch
(training-time evaluation, parity tests).

Shapes: B batch, S source length, V target vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

State = dict[str, np.ndarray]


class StepModel(Protocol):
    """An encoder plus a single decoder step, numpy in and out."""

    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> State:
        """src_ids (B, S) int64, src_mask (B, S) bool -> the decoder's initial state."""
        ...

    def step(self, prev_tokens: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """prev_tokens (B,) int64 -> logits (B, V), attention (B, S), next state."""
        ...


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence: token ids (without </s>) and its attention (T, S_src)."""

    token_ids: list[int]
    attention: np.ndarray
    finished: bool


def pad_batch(sequences: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pads id lists into (B, S) int64 ids and a (B, S) bool mask."""
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    return ids, ids != pad_id


def greedy_decode(
    model: StepModel,
    sources: list[list[int]],
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
) -> list[Hypothesis]:
    """Greedy decoding of a batch of source id lists.

    Args:
        model: the encoder and decoder step.
        sources: one list of source token ids per row (non-empty, without padding).
        bos_id: id fed at the first step; eos_id: id that ends a row.
        max_steps: per row, the most tokens to emit (</s> not counted).

    Returns:
        One hypothesis per row, in input order.
    """
    src_ids, src_mask = pad_batch(sources)  # (B, S)
    batch, src_len = src_ids.shape
    state = model.encode(src_ids, src_mask)
    limits = np.asarray(max_steps)
    tokens = np.zeros((batch, int(limits.max(initial=0))), dtype=np.int64)
    attention = np.zeros((batch, tokens.shape[1], src_len), dtype=np.float32)
    lengths = np.zeros(batch, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    active = np.flatnonzero(limits > 0)  # rows still decoding, as indices into the batch
    state = {k: v[active] for k, v in state.items()}
    prev = np.full(len(active), bos_id, dtype=np.int64)
    t = 0
    while len(active):
        logits, weights, state = model.step(prev, state)  # (b, V), (b, S), ...
        prev = logits.argmax(axis=1).astype(np.int64)  # (b,)
        ended = prev == eos_id
        emit = active[~ended]
        tokens[emit, t] = prev[~ended]
        attention[emit, t] = weights[~ended]
        lengths[emit] += 1
        finished[active[ended]] = True
        t += 1
        keep = ~ended & (lengths[active] < limits[active])
        if not keep.all():
            active, prev = active[keep], prev[keep]
            state = {k: v[keep] for k, v in state.items()}
    src_lengths = src_mask.sum(axis=1)
    return [
        Hypothesis(
            token_ids=tokens[row, : lengths[row]].tolist(),
            attention=attention[row, : lengths[row], : src_lengths[row]],
            finished=bool(finished[row]),
        )
        for row in range(batch)
    ]
