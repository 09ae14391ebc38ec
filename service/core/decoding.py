"""Greedy and beam decoding over any encoder + single-step decoder (plain numpy, no Ray).

A `StepModel` exposes `encode()` and `step()`; a `SourceBatch` holds the encoder's inputs (token
ids and mask for text, pixels for images) and how many attention columns of each row are real.
The decoder state is a dict of arrays whose first axis is the batch, so the loop can drop
finished rows after every step and keep decoding only the rows still running. The same loop
drives ONNX Runtime (serving, evaluation) and PyTorch (training-time evaluation, parity tests).

Shapes: B batch, S source length, V target vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

State = dict[str, np.ndarray]


class StepModel(Protocol):
    """An encoder plus a single decoder step, numpy in and out."""

    def encode(self, inputs: dict[str, np.ndarray]) -> State:
        """The encoder's named inputs (batch first) -> the decoder's initial state."""
        ...

    def step(self, prev_tokens: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """prev_tokens (B,) int64 -> logits (B, V), attention (B, S), next state."""
        ...


EXTRA_PREFIX = "attention:"  # state entries holding extra attention outputs (see wiring.py)


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence: token ids (without </s>), its attention (T, S_src), and any extra
    attention asked for by name: per-step outputs stacked to (T, ...) (a growing last axis is
    zero-padded to T), encoder outputs as they are for this row."""

    token_ids: list[int]
    attention: np.ndarray
    finished: bool
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def _stack_steps(steps: list[np.ndarray]) -> np.ndarray:
    """Per-step arrays (..., X_t) -> (T, ..., max X_t), zero-padded on the last axis."""
    if not steps:
        return np.zeros((0,), dtype=np.float32)
    width = max(a.shape[-1] for a in steps)
    out = np.zeros((len(steps), *steps[0].shape[:-1], width), dtype=np.float32)
    for t, a in enumerate(steps):
        out[t, ..., : a.shape[-1]] = a
    return out


def _carried(state: State, step_names: list[str]) -> State:
    """The state without the extra attention nobody asked for, so rows are not copied for nothing."""
    keep = {EXTRA_PREFIX + n for n in step_names}
    return {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX) or k in keep}


def _extras(state: State, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(per-step names, encoder names) of the requested extra attention outputs.

    Raises:
        ValueError: if a requested encoder output is not in the encoder's state.
    """
    encoder = [n for n in names if n.startswith("encoder")]
    missing = [n for n in encoder if EXTRA_PREFIX + n not in state]
    if missing:
        raise ValueError(f"the model returns no {missing} attention")
    return [n for n in names if n not in encoder], encoder


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


def greedy_decode(
    model: StepModel,
    source: SourceBatch,
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
    extras: tuple[str, ...] = (),
) -> list[Hypothesis]:
    """Greedy decoding of a batch of source id lists.

    Args:
        model: the encoder and decoder step.
        source: the encoder inputs of the batch.
        bos_id: id fed at the first step; eos_id: id that ends a row.
        max_steps: per row, the most tokens to emit (</s> not counted).
        extras: extra attention outputs to collect by name (e.g. "cross_heads", "encoder_self").

    Returns:
        One hypothesis per row, in input order.

    Raises:
        ValueError: if the model does not return a requested extra attention.
    """
    batch = source.size
    state = model.encode(source.inputs)
    step_names, encoder_names = _extras(state, extras)
    encoder_out = {n: state[EXTRA_PREFIX + n] for n in encoder_names}
    collected: dict[str, list[list[np.ndarray]]] = {n: [[] for _ in range(batch)] for n in step_names}
    limits = np.asarray(max_steps)
    tokens = np.zeros((batch, int(limits.max(initial=0))), dtype=np.int64)
    attention = np.zeros((batch, tokens.shape[1], 0), dtype=np.float32)  # widened at the first step
    lengths = np.zeros(batch, dtype=np.int64)
    finished = np.zeros(batch, dtype=bool)
    active = np.flatnonzero(limits > 0)  # rows still decoding, as indices into the batch
    state = {k: v[active] for k, v in _carried(state, step_names).items()}
    prev = np.full(len(active), bos_id, dtype=np.int64)
    t = 0
    while len(active):
        logits, weights, state = model.step(prev, state)  # (b, V), (b, S), ...
        state = _carried(state, step_names)
        if t == 0:
            attention = np.zeros((batch, tokens.shape[1], weights.shape[1]), dtype=np.float32)
        prev = logits.argmax(axis=1).astype(np.int64)  # (b,)
        ended = prev == eos_id
        emit = active[~ended]
        tokens[emit, t] = prev[~ended]
        attention[emit, t] = weights[~ended]
        for name in step_names:
            for row, value in zip(emit, state[EXTRA_PREFIX + name][~ended], strict=True):
                collected[name][row].append(value)
        lengths[emit] += 1
        finished[active[ended]] = True
        t += 1
        keep = ~ended & (lengths[active] < limits[active])
        if not keep.all():
            active, prev = active[keep], prev[keep]
            state = {k: v[keep] for k, v in state.items()}
    return [
        Hypothesis(
            token_ids=tokens[row, : lengths[row]].tolist(),
            attention=attention[row, : lengths[row], source.columns(row)],
            finished=bool(finished[row]),
            extras=_row_extras(collected, encoder_out, row, source),
        )
        for row in range(batch)
    ]


def _row_extras(collected, encoder_out, row: int, source: SourceBatch, origin: int | None = None):
    """One row's extra attention: steps stacked, source axes cut to the row's real length."""
    cols = source.columns(row)
    out = {n: _stack_steps(steps[row if origin is None else origin]) for n, steps in collected.items()}
    for name, value in out.items():
        if name.startswith("cross") and value.size:
            out[name] = value[..., cols]
    for name, value in encoder_out.items():
        out[name] = value[row][..., cols, cols]
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def length_normalised(score: float, length: int, alpha: float) -> float:
    """GNMT length penalty: score / ((5 + length) / 6) ** alpha; alpha 0 leaves the score."""
    return score / (((5 + length) / 6) ** alpha)


def beam_decode(
    model: StepModel,
    source: SourceBatch,
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
    beam_size: int,
    length_penalty: float = 0.0,
    extras: tuple[str, ...] = (),
) -> list[Hypothesis]:
    """Beam search over a batch: every row keeps `beam_size` hypotheses, all rows step together.

    A finished hypothesis only extends with </s> at no cost, so it keeps its score; a row that
    reaches its limit is finished there. The best hypothesis by length-normalised log-probability
    is returned with its own attention.

    Args:
        model, source, bos_id, eos_id, max_steps, extras: as for greedy_decode.
        beam_size: hypotheses kept per row (1 gives greedy decoding).
        length_penalty: GNMT alpha; 0 ranks by total log-probability.

    Returns:
        One hypothesis per row, in input order.
    """
    batch = source.size
    K = beam_size
    state = model.encode(source.inputs)
    step_names, encoder_names = _extras(state, extras)
    encoder_out = {n: state[EXTRA_PREFIX + n] for n in encoder_names}
    state = {k: np.repeat(v, K, axis=0) for k, v in _carried(state, step_names).items()}  # (B*K, ...)
    collected: dict[str, list[list[np.ndarray]]] = {n: [[] for _ in range(batch * K)] for n in step_names}
    limits = np.repeat(np.asarray(max_steps), K)  # (B*K,)
    width = int(limits.max(initial=0))
    scores = np.tile(np.r_[0.0, np.full(K - 1, -np.inf)], batch)  # (B*K,): one live beam at first
    tokens = np.zeros((batch * K, width), dtype=np.int64)
    attention = np.zeros((batch * K, width, 0), dtype=np.float32)  # widened at the first step
    lengths = np.zeros(batch * K, dtype=np.int64)
    finished = limits == 0
    prev = np.full(batch * K, bos_id, dtype=np.int64)
    for t in range(width):
        if finished.all():
            break
        logits, weights, state = model.step(prev, state)  # (B*K, V), (B*K, S)
        state = _carried(state, step_names)
        if t == 0:
            attention = np.zeros((batch * K, width, weights.shape[1]), dtype=np.float32)
        logp = _log_softmax(logits.astype(np.float64))
        logp[finished] = -np.inf
        logp[finished, eos_id] = 0.0  # finished hypotheses carry their score unchanged
        vocab = logp.shape[1]
        total = (scores[:, None] + logp).reshape(batch, K * vocab)  # (B, K*V)
        best = np.argsort(-total, axis=1, kind="stable")[:, :K]  # (B, K)
        parent = (best // vocab + np.arange(batch)[:, None] * K).ravel()  # (B*K,)
        token = (best % vocab).ravel()
        scores = total[np.arange(batch)[:, None], best].ravel()
        was_finished = finished[parent]
        tokens, attention, lengths = tokens[parent], attention[parent], lengths[parent].copy()
        state = {k: v[parent] for k, v in state.items()}
        grow = ~was_finished & (token != eos_id)
        tokens[grow, t] = token[grow]
        attention[grow, t] = weights[parent][grow]
        for name in step_names:
            values = state[EXTRA_PREFIX + name]  # already reordered to the new beams
            collected[name] = [list(collected[name][p]) for p in parent]
            for i in np.flatnonzero(grow):
                collected[name][i].append(values[i])
        lengths[grow] += 1
        finished = was_finished | (token == eos_id) | (lengths >= limits)
        prev = np.where(finished, eos_id, token)
    results = []
    for row in range(batch):
        beams = range(row * K, row * K + K)
        pick = max(beams, key=lambda i: length_normalised(scores[i], int(lengths[i]), length_penalty))
        results.append(
            Hypothesis(
                token_ids=tokens[pick, : lengths[pick]].tolist(),
                attention=attention[pick, : lengths[pick], source.columns(row)],
                finished=bool(finished[pick]),
                extras=_row_extras(collected, encoder_out, row, source, origin=pick),
            )
        )
    return results


def decode(
    model: StepModel,
    source: SourceBatch,
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
    beam_size: int = 1,
    length_penalty: float = 0.0,
    extras: tuple[str, ...] = (),
) -> list[Hypothesis]:
    """Greedy decoding for beam_size 1 (it drops finished rows as it goes), beam search above."""
    if beam_size > 1:
        return beam_decode(model, source, bos_id, eos_id, max_steps, beam_size, length_penalty, extras)
    return greedy_decode(model, source, bos_id, eos_id, max_steps, extras)
