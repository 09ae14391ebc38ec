"""Step-level batched greedy and beam decoding over any encoder + single-step decoder (numpy, no Ray).

A `RunningBatch` holds the decoder rows of every request being decoded. Requests join it at any
step (`add` encodes them together and merges their rows, padding source axes as needed) and
leave it as soon as they finish (`step` returns them), so a short request never waits for long
ones and a finished row's slot is reused at once. A greedy request is one row; a beam request is
beam_size rows of the same batch. Each row carries its own position, so rows that started at
different steps decode together; a Transformer's KV cache is a preallocated buffer per layer that
each step writes one column into (no copies), and every other state array is a buffer whose first
`rows` entries are the live rows: a finished row is replaced by the last live one.

The same loop drives ONNX Runtime (serving, evaluation) and PyTorch (training-time evaluation,
parity tests); `decode()` runs a whole batch through it.

Shapes: C row capacity, n live rows, S source length (capacity S_cap), T cache capacity,
V target vocabulary, Tmax the most tokens any row may emit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from attnserve.core.manifest import DecoderSpec
from attnserve.core.sources import SourceBatch, length_groups
from attnserve.core.wiring import CACHE_AXIS, EXTRA_PREFIX, State

MIN_CACHE = 16  # capacities of source and cache axes are multiples of this
# The fixed cost of an encoder call in source tokens (en-fr-transformer, 2 threads, one row of 8
# and of 32 tokens: 0.33-0.67 ms a call, 15-30 us a token at int8 and fp32, so 16-22 tokens):
# `add` splits a join into calls by length when the padding saved outweighs it.
ENCODER_CALL_TOKENS = 16


class StepModel(Protocol):
    """An encoder plus a single decoder step, numpy in and out (see wiring.WiredStepModel)."""

    spec: DecoderSpec
    state_inputs: list[str]
    source_axes: dict[str, int]

    def encode(self, inputs: dict[str, np.ndarray]) -> State:
        """The encoder's named inputs (batch first) -> the decoder's initial state."""
        ...

    def run_decoder(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoder step's named inputs -> its named outputs."""
        ...


@dataclass(frozen=True)
class Hypothesis:
    """One decoded sequence: token ids (without </s>), its attention (T, S_src), and any extra
    attention asked for by name: per-step outputs stacked to (T, ...) (a growing last axis is
    zero-padded to T), encoder outputs as they are for this row.

    Scored jobs and beams also carry each token's natural-log probability (T,) and `score`, their
    sum plus that of </s> when the sequence ended with it; a beam job asking for n-best carries
    its next-best hypotheses, best first, in `alternatives`.
    """

    token_ids: list[int]
    attention: np.ndarray
    finished: bool
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    token_logprobs: np.ndarray | None = None
    score: float | None = None
    alternatives: tuple[Hypothesis, ...] = ()


Logp = np.ndarray | None  # (n,) natural-log probability of each row's chosen token
TokenCallback = Callable[[int, np.ndarray, float | None], None]  # token id, attention row (S_src,), log-prob


@dataclass(eq=False)
class DecodeJob:
    """One request's decoding settings; `on_token` sees each token as it is chosen (a beam's
    tokens when it ends).

    A `tag` is the caller's own object (the engine keeps its request there).
    """

    max_steps: int
    beam_size: int = 1
    length_penalty: float = 0.0
    extras: tuple[str, ...] = ()
    on_token: TokenCallback | None = None
    tag: object = None
    scores: bool = False  # record each token's log-probability (beams always do)
    num_hypotheses: int = 1  # hypotheses to return, best first (beam jobs)
    # Filled by the running batch.
    columns: slice = field(default_factory=lambda: slice(None))
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    encoder_extras: dict[str, np.ndarray] = field(default_factory=dict)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, V) logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _token_logprobs(logits: np.ndarray, token: np.ndarray) -> np.ndarray:
    """log_softmax(logits)[r, token[r]] of (k, V) logits, without the (k, V) log-softmax: one
    exp pass in the logits' precision, sums in float64."""
    top = logits.max(axis=1)  # (k,)
    shifted = logits - top[:, None]  # (k, V)
    total = np.exp(shifted, out=shifted).sum(axis=1, dtype=np.float64)  # (k,)
    return logits[np.arange(len(token)), token] - top - np.log(total)


def length_normalised(score: float, length: int, alpha: float) -> float:
    """GNMT length penalty: score / ((5 + length) / 6) ** alpha; alpha 0 leaves the score."""
    return score / (((5 + length) / 6) ** alpha)


def _resize(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """A copy of `array` with `axis` cut or zero-padded to `size`."""
    shape = list(array.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=array.dtype)
    keep = [slice(None)] * array.ndim
    keep[axis] = slice(0, min(size, array.shape[axis]))
    out[tuple(keep)] = array[tuple(keep)]
    return out


class RunningBatch:
    """The rows being decoded; requests join with `add` and leave when `step` returns them.

    Args:
        model: the encoder and decoder step.
        bos_id: id fed at the first step; eos_id: id that ends a row.
        max_steps: the most tokens any request may ask for (sizes the history buffers).
    """

    def __init__(self, model: StepModel, bos_id: int, eos_id: int, max_steps: int):
        self.model, self.spec = model, model.spec
        self.bos_id, self.eos_id, self.max_steps = bos_id, eos_id, max_steps
        self.rows = 0
        self.jobs: list[DecodeJob] = []  # jobs with rows in the batch
        self._owner: list[DecodeJob | None] = []  # per slot
        self._buffers: dict[str, np.ndarray] = {}  # decoder state inputs, (C, ...)
        self._slot: dict[str, np.ndarray] = {}  # per-row bookkeeping and history, (C, ...)
        self._steps: list[dict[str, list[np.ndarray]] | None] = []  # per slot, extra attention steps
        self._src_cap = 0
        self._cache_cap = 0

    # -- joining -------------------------------------------------------------------------------

    def add(self, jobs: Sequence[DecodeJob], source: SourceBatch) -> list[tuple[DecodeJob, Hypothesis]]:
        """Encodes the jobs' sources and merges their rows into the batch.

        Text rows are encoded in groups of similar length (`length_groups`), so the encoder
        computes little padding; the decoder's source axes are padded to the batch's capacity.

        Args:
            jobs: one per source row.
            source: the encoder inputs of the jobs, in order.

        Returns:
            The jobs already finished (a limit of 0 steps) with their empty hypotheses; the others
            are decoding.

        Raises:
            ValueError: if a job asks for extra attention the model does not return.
        """
        if source.lengths is None or len(jobs) == 1:
            return self._join(jobs, source)
        self._reserve(self.rows + sum(j.beam_size for j in jobs))  # room for every group at once
        if self.model.source_axes and int(source.lengths.max()) > self._src_cap:
            self._resize_source(_rounded(int(source.lengths.max())))
        done = []
        for rows in length_groups(source.lengths, ENCODER_CALL_TOKENS):
            done += self._join([jobs[i] for i in rows], source.take(rows))
        return done

    def _join(self, jobs: Sequence[DecodeJob], source: SourceBatch) -> list[tuple[DecodeJob, Hypothesis]]:
        """Encodes the jobs' sources in one call and merges their rows into the batch (see `add`)."""
        state = self.model.encode(source.inputs)
        done = []
        for i, job in enumerate(jobs):
            job.columns = source.columns(i)
            names = [n for n in job.extras if n.startswith("encoder")]
            missing = [n for n in names if EXTRA_PREFIX + n not in state]
            if missing:
                raise ValueError(f"the model returns no {missing} attention")
            job.encoder_extras = {n: state[EXTRA_PREFIX + n][i][..., job.columns, job.columns] for n in names}
            if job.max_steps <= 0:
                done.append((job, _empty_hypothesis(job, source)))
        repeats = np.array([j.beam_size if j.max_steps > 0 else 0 for j in jobs])
        new = int(repeats.sum())
        if not new:
            return done
        first = self.rows
        self._reserve(first + new)
        rows = np.repeat(np.arange(len(jobs)), repeats)  # (new,) source row of each new slot
        width = max((state[n].shape[a] for n, a in self.model.source_axes.items()), default=0)
        if width > self._src_cap:
            self._resize_source(_rounded(width))
        one_each = new == len(jobs)  # no beams and no empty jobs: rows are the encoder's, in order
        for name in self.model.state_inputs:
            value = state[name] if one_each else state[name][rows]
            if name in self.spec.cache.values():  # empty (new, ..., 0, X): positions mask the columns
                if name not in self._buffers:
                    self._cache_cap = max(self._cache_cap, MIN_CACHE)
                    shape = list(value.shape[1:])
                    shape[CACHE_AXIS] = self._cache_cap
                    self._buffer(name, shape, value.dtype)
                continue
            axis = self.model.source_axes.get(name)
            if axis is None:
                self._buffer(name, value.shape[1:], value.dtype)[first : first + new] = value
                continue
            shape = list(value.shape[1:])
            shape[axis - 1] = self._src_cap
            target = self._buffer(name, shape, value.dtype)[first : first + new]
            columns = [slice(None)] * value.ndim
            columns[axis] = slice(0, value.shape[axis])
            target[tuple(columns)] = value
            columns[axis] = slice(value.shape[axis], None)
            target[tuple(columns)] = 0  # padding: masked out, and never stale
        lengths = np.full(len(jobs), self._src_cap) if source.lengths is None else source.lengths
        slot = self._slot
        slot["prev"][first : first + new] = self.bos_id
        slot["position"][first : first + new] = 0
        slot["length"][first : first + new] = 0
        slot["done"][first : first + new] = False
        slot["ended"][first : first + new] = False
        slot["watched"][first : first + new] = [
            jobs[r].on_token is not None or any(not n.startswith("encoder") for n in jobs[r].extras)
            for r in rows
        ]
        slot["source_len"][first : first + new] = lengths[rows]
        slot["limit"][first : first + new] = [jobs[r].max_steps for r in rows]
        slot["beam"][first : first + new] = [jobs[r].beam_size > 1 for r in rows]
        slot["scored"][first : first + new] = [jobs[r].scores for r in rows]
        slot["eos_logprob"][first : first + new] = 0.0
        scores = np.zeros(new)
        for start in np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]):
            scores[start + 1 : start + repeats[rows[start]]] = -np.inf  # one live beam at first
        slot["score"][first : first + new] = scores
        for offset, r in enumerate(rows):
            job = jobs[r]
            self._owner[first + offset] = job
            step_names = [n for n in job.extras if not n.startswith("encoder")]
            self._steps[first + offset] = {n: [] for n in step_names} if step_names else None
        for r, job in enumerate(jobs):
            if repeats[r]:
                job.slots = first + np.flatnonzero(rows == r)
                self.jobs.append(job)
        self.rows += new
        return done

    def _reserve(self, rows: int) -> None:
        """Grows the row capacity to at least `rows`."""
        capacity = len(self._owner)
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity, 8)
        if not self._slot:
            self._slot = {
                "prev": np.zeros(capacity, np.int64),
                "position": np.zeros(capacity, np.int64),
                "length": np.zeros(capacity, np.int64),
                "limit": np.zeros(capacity, np.int64),
                "done": np.zeros(capacity, bool),
                "ended": np.zeros(capacity, bool),  # the row emitted </s>
                "watched": np.zeros(capacity, bool),  # its job streams tokens or collects extras
                "score": np.zeros(capacity, np.float64),  # a beam row's total log-probability
                "beam": np.zeros(capacity, bool),  # the row belongs to a beam job
                "scored": np.zeros(capacity, bool),  # its job asked for log-probabilities
                "eos_logprob": np.zeros(capacity, np.float64),  # of </s>, when the row chose it
                "logprob": np.zeros((capacity, self.max_steps), np.float32),  # of each emitted token
                "source_len": np.zeros(capacity, np.int64),
                "tokens": np.zeros((capacity, self.max_steps), np.int64),
                "attention": np.zeros((capacity, self.max_steps, self._src_cap), np.float32),
            }
        else:
            self._slot = {k: _resize(v, 0, capacity) for k, v in self._slot.items()}
        self._buffers = {k: _resize(v, 0, capacity) for k, v in self._buffers.items()}
        grow = capacity - len(self._owner)
        self._owner += [None] * grow
        self._steps += [None] * grow

    def _buffer(self, name: str, row_shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
        """The state buffer `name`, allocated on first use with rows of `row_shape`."""
        if name not in self._buffers:
            self._buffers[name] = np.zeros((len(self._owner), *row_shape), dtype)
        return self._buffers[name]

    def _resize_source(self, width: int) -> None:
        """Re-allocates every source-length axis (state and attention history) to `width`."""
        for name, axis in self.model.source_axes.items():
            if name in self._buffers:
                self._buffers[name] = _resize(self._buffers[name], axis, width)
        self._slot["attention"] = _resize(self._slot["attention"], 2, width)
        self._src_cap = width

    def _resize_caches(self, width: int) -> None:
        """Re-allocates every cache's position axis to `width`."""
        for name in self.spec.cache.values():
            if name in self._buffers:
                self._buffers[name] = _resize(
                    self._buffers[name], CACHE_AXIS % self._buffers[name].ndim, width
                )
        self._cache_cap = width

    # -- stepping ------------------------------------------------------------------------------

    def run(self, jobs: Sequence[DecodeJob], source: SourceBatch) -> list[tuple[DecodeJob, Hypothesis]]:
        """Adds the jobs and steps until the batch is empty; returns every job with its hypothesis."""
        done = self.add(jobs, source)
        while self.rows:
            done += self.step()
        return done

    def remove(self, jobs: Sequence[DecodeJob]) -> None:
        """Takes jobs out of the batch unfinished (their callers went away)."""
        gone = {id(job) for job in jobs}
        leaving = [job for job in self.jobs if id(job) in gone]
        if leaving:
            self.jobs = [job for job in self.jobs if id(job) not in gone]
            self._compact(np.concatenate([job.slots for job in leaving]))

    def step(self) -> list[tuple[DecodeJob, Hypothesis]]:
        """Runs one decoder step for every row; returns the jobs that finished and removes their rows."""
        n, slot, spec = self.rows, self._slot, self.spec
        if not n:
            return []
        position = slot["position"][:n]
        if spec.cache and int(position.max()) >= self._cache_cap:
            self._resize_caches(_rounded(max(2 * self._cache_cap, int(position.max()) + 1)))
        feeds = {
            spec.token_input: slot["prev"][:n],
            **{k: self._buffers[k][:n] for k in self.model.state_inputs},
        }
        if spec.position_input:
            feeds[spec.position_input] = position
        out = self.model.run_decoder(feeds)
        for out_name, in_name in spec.recurrent.items():
            self._buffers[in_name][:n] = out[out_name]
        rows = np.arange(n)
        columns: dict[tuple[int, ...], np.ndarray] = {}  # per cache shape, where this step's column goes
        for out_name, in_name in spec.cache.items():
            buffer, new = self._buffers[in_name], out[out_name]  # (C, ..., T, X), (n, ..., 1, X)
            if buffer.shape not in columns:
                columns[buffer.shape] = _cache_columns(buffer.shape, position)
            buffer.reshape(-1, buffer.shape[-1])[columns[buffer.shape]] = new.reshape(-1, new.shape[-1])
        logits, weights = out[spec.logits_output], out[spec.attention_output]  # (n, V), (n, S_cap)
        token, parent, logp = self._choose(logits, rows)
        if parent is not rows and (parent != rows).any():
            self._reorder(parent, n)
            weights = weights[parent]
        live = ~slot["done"][:n]
        grow = live & (token != self.eos_id)
        ending = live & (token == self.eos_id)
        slot["ended"][:n] |= ending
        emit = np.flatnonzero(grow)
        if logp is not None:
            slot["logprob"][emit, slot["length"][emit]] = logp[emit]
            slot["eos_logprob"][:n][ending] = logp[ending]
        if weights.shape[1] > slot["attention"].shape[2]:  # images: the grid's width, known now
            slot["attention"] = _resize(slot["attention"], 2, weights.shape[1])
        slot["tokens"][emit, slot["length"][emit]] = token[emit]
        slot["attention"][emit, slot["length"][emit], : weights.shape[1]] = weights[emit]
        watched = emit[slot["watched"][emit]]  # rows with a token callback or extra attention
        self._record_extras(out, watched, parent, position)
        for i in watched:
            job = self._owner[i]
            if job.on_token is not None and job.beam_size == 1:
                job.on_token(int(token[i]), weights[i, job.columns], None if logp is None else float(logp[i]))
        slot["length"][:n] += grow
        slot["done"][:n] |= (token == self.eos_id) | (slot["length"][:n] >= slot["limit"][:n])
        slot["prev"][:n] = np.where(slot["done"][:n], self.eos_id, token)
        slot["position"][:n] += 1
        return self._retire()

    def _choose(self, logits: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, Logp]:
        """Next token (n,), parent slot (n,) and the token's log-probability (n,) of every row:
        argmax for greedy rows, beam search within each beam job's rows. The parent is `rows`
        itself when no row has a beam; log-probabilities are None when no row needs them, and
        computed only for the rows that do (scored greedy rows and beams)."""
        slot = self._slot
        n = len(rows)
        token = logits.argmax(axis=1).astype(np.int64, copy=False)
        beam_rows = slot["beam"][:n]
        beams = [job for job in self.jobs if job.beam_size > 1] if beam_rows.any() else []
        parent = rows.copy() if beams else rows
        scored = np.flatnonzero(slot["scored"][:n] & ~beam_rows)
        logp = np.zeros(n) if beams or len(scored) else None
        if len(scored):
            logp[scored] = _token_logprobs(logits[scored], token[scored])
        for job in beams:
            s = job.slots  # (K,)
            step = _log_softmax(logits[s].astype(np.float64))  # (K, V)
            finished = slot["done"][s]
            step[finished] = -np.inf
            step[finished, self.eos_id] = 0.0  # finished hypotheses carry their score unchanged
            vocab = step.shape[1]
            total = (slot["score"][s][:, None] + step).ravel()  # (K*V,)
            best = np.argsort(-total, kind="stable")[: job.beam_size]
            parent[s] = s[best // vocab]
            token[s] = best % vocab
            logp[s] = total[best] - slot["score"][parent[s]]
            slot["score"][s] = total[best]
        return token, parent, logp

    def _reorder(self, parent: np.ndarray, n: int) -> None:
        """Copies each beam row's parent state into it (state, history and extras)."""
        moved = np.flatnonzero(parent != np.arange(n))
        source = parent[moved]
        for buffers in (self._buffers, self._slot):
            for name, buf in buffers.items():
                if name != "score":  # scores are already the new beams'
                    buf[moved] = buf[source]
        old = [self._steps[i] for i in range(n)]
        for i, p in zip(moved, source, strict=True):
            self._steps[i] = None if old[p] is None else {k: list(v) for k, v in old[p].items()}

    def _record_extras(self, out, rows: np.ndarray, parent: np.ndarray, position: np.ndarray) -> None:
        """Appends this step's extra attention to those of `rows` that asked for it."""
        for i in rows:
            steps = self._steps[i]
            if steps is None:
                continue
            for name in steps:
                value = out[self.spec.step_attention[name]][parent[i]]
                if self.spec.cache and name == "decoder_self":  # cache columns < position, then itself
                    value = np.concatenate([value[..., : position[parent[i]]], value[..., -1:]], axis=-1)
                elif name.startswith("cross"):
                    value = value[..., self._owner[i].columns]
                steps[name].append(value)

    def _retire(self) -> list[tuple[DecodeJob, Hypothesis]]:
        """Removes finished jobs; returns them with their hypotheses."""
        finished, keep = [], []
        done = self._slot["done"]
        candidates = {id(self._owner[i]) for i in np.flatnonzero(done[: self.rows])}
        if not candidates:
            return []
        for job in self.jobs:
            if id(job) in candidates and done[job.slots].all():
                hyp = self._hypothesis(job)
                if job.on_token is not None and job.beam_size > 1:  # a beam's tokens are final only now
                    for t, token in enumerate(hyp.token_ids):
                        job.on_token(token, hyp.attention[t], float(hyp.token_logprobs[t]))
                finished.append((job, hyp))
            else:
                keep.append(job)
        if not finished:
            return []
        self.jobs = keep
        free = np.concatenate([job.slots for job, _ in finished])
        self._compact(free)
        return finished

    def _hypothesis(self, job: DecodeJob) -> Hypothesis:
        """The job's result: its best row's tokens, attention, extras and scores, with the next
        best rows as alternatives when the job asks for more than one hypothesis."""
        slot = self._slot
        ranked = list(job.slots)
        if job.beam_size > 1:
            ranked.sort(
                key=lambda i: -length_normalised(slot["score"][i], int(slot["length"][i]), job.length_penalty)
            )
            ranked = [i for i in ranked if np.isfinite(slot["score"][i])] or ranked[:1]
        best, *others = ranked[: max(job.num_hypotheses, 1)]
        extras = dict(job.encoder_extras)
        if self._steps[best] is not None:
            extras.update({k: _stack_steps(v) for k, v in self._steps[best].items()})
        alternatives = tuple(self._row_hypothesis(job, i, {}) for i in others)
        return replace(self._row_hypothesis(job, best, extras), alternatives=alternatives)

    def _row_hypothesis(self, job: DecodeJob, row: int, extras: dict[str, np.ndarray]) -> Hypothesis:
        """One row's tokens, attention and (for scored jobs and beams) log-probabilities."""
        slot = self._slot
        length = int(slot["length"][row])
        logprobs, score = None, None
        if job.scores or job.beam_size > 1:
            logprobs = slot["logprob"][row, :length].copy()
            score = float(logprobs.astype(np.float64).sum() + slot["eos_logprob"][row])
        return Hypothesis(
            token_ids=slot["tokens"][row, :length].tolist(),
            attention=slot["attention"][row, :length, job.columns].copy(),
            finished=bool(slot["ended"][row]),
            extras=extras,
            token_logprobs=logprobs,
            score=score,
        )

    def _compact(self, free: np.ndarray) -> None:
        """Moves the last live rows into the freed slots so live rows stay first."""
        n = self.rows - len(free)
        holes = np.sort(free[free < n])
        movers = np.setdiff1d(np.arange(n, self.rows), free)  # live rows past the new end, sorted
        if len(holes):
            for buffers in (self._buffers, self._slot):
                for buf in buffers.values():
                    buf[holes] = buf[movers]
            for i, j in zip(movers.tolist(), holes.tolist(), strict=True):
                self._owner[j], self._steps[j] = self._owner[i], self._steps[i]
            moved_to = np.arange(self.rows)
            moved_to[movers] = holes
            for job in self.jobs:
                job.slots = moved_to[job.slots]
        for i in range(n, self.rows):
            self._owner[i], self._steps[i] = None, None
        self.rows = n
        self._shrink()

    def _shrink(self) -> None:
        """Gives back source and cache capacity the live rows no longer need."""
        n = self.rows
        if not n:
            return
        if self.model.source_axes and self._src_cap > MIN_CACHE:
            need = int(self._slot["source_len"][:n].max())
            if need <= self._src_cap // 4:
                self._resize_source(_rounded(need))
        if self.spec.cache and self._cache_cap > 2 * MIN_CACHE:
            need = int(self._slot["position"][:n].max()) + 1
            if need <= self._cache_cap // 4:
                self._resize_caches(_rounded(2 * need))


def _empty_hypothesis(job: DecodeJob, source: SourceBatch) -> Hypothesis:
    """The result of a job allowed no tokens: no rows of attention over its real source columns."""
    ids = source.inputs.get("src_ids")
    attention = np.zeros((0, 0 if ids is None else ids.shape[1]), np.float32)[:, job.columns]
    return Hypothesis([], attention, False, dict(job.encoder_extras))


def _cache_columns(shape: tuple[int, ...], position: np.ndarray) -> np.ndarray:
    """Rows of a (C, ..., T, X) cache seen as (C * M * T, X) that hold column position[r] of each
    live row r, in the order of a (n, ..., 1, X) step output: one fancy index on one axis, much
    cheaper than indexing rows and positions on two axes."""
    middle, capacity = int(np.prod(shape[1:-2], dtype=np.int64)), shape[-2]  # M, T
    inner = np.arange(len(position))[:, None] * middle + np.arange(middle)[None, :]  # (n, M)
    return (inner * capacity + position[:, None]).ravel()  # (n * M,)


def _rounded(size: int) -> int:
    """A capacity for `size`: the next multiple of MIN_CACHE, so sizes do not change every step."""
    return max(MIN_CACHE, -(-size // MIN_CACHE) * MIN_CACHE)


def _stack_steps(steps: list[np.ndarray]) -> np.ndarray:
    """Per-step arrays (..., X_t) -> (T, ..., max X_t), zero-padded on the last axis."""
    if not steps:
        return np.zeros((0,), dtype=np.float32)
    width = max(a.shape[-1] for a in steps)
    out = np.zeros((len(steps), *steps[0].shape[:-1], width), dtype=np.float32)
    for t, a in enumerate(steps):
        out[t, ..., : a.shape[-1]] = a
    return out


def decode(
    model: StepModel,
    source: SourceBatch,
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
    beam_size: int = 1,
    length_penalty: float = 0.0,
    extras: tuple[str, ...] = (),
    scores: bool = False,
    num_hypotheses: int = 1,
) -> list[Hypothesis]:
    """Decodes a batch of sources to the end (greedy for beam_size 1, else beam search).

    Args:
        model: the encoder and decoder step.
        source: the encoder inputs of the batch.
        bos_id: id fed at the first step; eos_id: id that ends a row.
        max_steps: per row, the most tokens to emit (</s> not counted).
        beam_size: hypotheses kept per row; a finished hypothesis keeps its score and the best
            by length-normalised log-probability is returned with its own attention.
        length_penalty: GNMT alpha; 0 ranks by total log-probability.
        extras: extra attention outputs to collect by name (e.g. "cross_heads", "encoder_self").
        scores: record every token's log-probability (beams always do).
        num_hypotheses: beam hypotheses to return per row, best first (in `alternatives`).

    Returns:
        One hypothesis per row, in input order.

    Raises:
        ValueError: if the model does not return a requested extra attention.
    """
    jobs = [
        DecodeJob(limit, beam_size, length_penalty, extras, scores=scores, num_hypotheses=num_hypotheses)
        for limit in max_steps
    ]
    batch = RunningBatch(model, bos_id, eos_id, max(max_steps, default=0))
    results = {id(job): hyp for job, hyp in batch.run(jobs, source)}
    return [results[id(job)] for job in jobs]


def greedy_decode(
    model: StepModel,
    source: SourceBatch,
    bos_id: int,
    eos_id: int,
    max_steps: list[int],
    extras: tuple[str, ...] = (),
) -> list[Hypothesis]:
    """Greedy decoding of a batch (see `decode`)."""
    return decode(model, source, bos_id, eos_id, max_steps, 1, 0.0, extras)
