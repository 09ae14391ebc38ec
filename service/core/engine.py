"""An engine per model: one thread that owns the model, admits requests and decodes batches.

Callers (asyncio handlers, batch jobs, tests) `submit()` a prepared request and get a
`concurrent.futures.Future`; the engine thread takes whatever is queued as soon as it is free
(up to `max_batch_size`, optionally a token budget), decodes it with the `Translator` and
completes the futures. Admission is decided in `submit()` without waiting: the queue is bounded
by count and by the wait the engine expects from its measured batch cost, so an overloaded model
says no in microseconds instead of queueing for longer than a client would wait. Deadlines are
honoured: a request whose deadline passes or whose future is cancelled while queued is dropped
without decoding, and one that cannot finish before its deadline is not started.

The batch is formed in `_take_batch()` and decoded in `_run_batch()`; step-level batching can
replace the second without touching admission. No Ray, no protos.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from attnserve.service.core.errors import ErrorCode, RequestError
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.onnx_model import RuntimeConfig
from attnserve.service.core.translation import PreparedRequest, Translation, Translator

log = logging.getLogger(__name__)
COST_SMOOTHING = 0.2  # weight of the newest batch in the running estimate of batch cost


@dataclass(frozen=True)
class EngineConfig:
    """Batching and admission settings of one model's engine (changeable while it runs).

    max_batch_size: requests decoded together at most.
    max_batch_tokens: 0 for no budget; else the most (source + output limit) x beam tokens per batch.
    batch_wait_s: how long a batch that is not full waits for more requests (0: never waits).
    max_queued: requests waiting at most; beyond it RESOURCE_EXHAUSTED.
    max_queue_wait_s: the longest the engine expects a request it accepts to wait, counting the
        decode of the request's own batch, judged from its measured cost per batch; beyond it
        RESOURCE_EXHAUSTED. A request that would not wait at all is always accepted.
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 0
    batch_wait_s: float = 0.0
    max_queued: int = 1024
    max_queue_wait_s: float = 2.0


class EngineObserver(Protocol):
    """What the engine reports; the service records it as metrics. Called from any thread."""

    def rejected(self, reason: str) -> None:
        """A request was refused at admission (queue_full, queue_wait, deadline, shutting_down)."""

    def dropped(self, reason: str) -> None:
        """A queued request was dropped without decoding (deadline, cancelled)."""

    def batch(self, waits: list[float], decode_s: float, output_tokens: int) -> None:
        """A batch was decoded: each request's queue wait, the decode time, tokens produced."""

    def queue_depth(self, queued: int) -> None:
        """Requests waiting after a batch was taken."""


class _Silent:
    """An observer that records nothing."""

    def rejected(self, reason: str) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def batch(self, waits: list[float], decode_s: float, output_tokens: int) -> None:
        pass

    def queue_depth(self, queued: int) -> None:
        pass


@dataclass(eq=False)
class _Job:
    """One admitted request and the future its caller waits on."""

    request: PreparedRequest
    deadline: float | None  # time.monotonic() seconds
    queued_at: float
    future: Future = field(default_factory=Future)

    @property
    def tokens(self) -> int:
        """What the request costs against a token budget."""
        r = self.request
        return (len(r.source_ids) + r.max_output_tokens) * r.beam_size


class BatchCost:
    """Running estimate of batch decode time as a + b * size, fitted to recent batches."""

    def __init__(self, smoothing: float = COST_SMOOTHING):
        self.smoothing = smoothing
        self._moments: list[float] | None = None  # smoothed n, t, n*n, n*t

    def observe(self, size: int, seconds: float) -> None:
        """Adds one decoded batch."""
        sample = [size, seconds, size * size, size * seconds]
        if self._moments is None:
            self._moments = sample
        else:
            w = self.smoothing
            self._moments = [(1 - w) * m + w * s for m, s in zip(self._moments, sample, strict=True)]

    def seconds(self, size: int) -> float | None:
        """Expected decode time of a batch of `size` requests; None before the first batch."""
        if self._moments is None:
            return None
        n, t, nn, nt = self._moments
        variance = nn - n * n
        if variance < 0.25:  # (nearly) one batch size seen so far: assume time proportional to size
            return t / n * size
        slope = max((nt - n * t) / variance, 0.0)
        return max(t - slope * n, 0.0) + slope * size


class Engine:
    """Owns one model's Translator on a thread of its own; thread-safe `submit()`."""

    def __init__(self, translator: Translator, config: EngineConfig = EngineConfig(), observer=None):
        self.translator = translator
        self.name = translator.manifest.name
        self.config = config
        self.observer: EngineObserver = observer or _Silent()
        self.cost = BatchCost()
        self._queue: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._running: tuple[float, int] | None = None  # (started, size) of the batch decoding now
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def reconfigure(self, config: EngineConfig) -> None:
        """Applies new batching and admission settings from the next batch on."""
        with self._lock:
            self.config = config
            self._lock.notify_all()

    def submit(self, request: PreparedRequest, deadline: float | None = None) -> Future:
        """Admits a request or refuses it at once.

        Args:
            request: a validated request.
            deadline: time.monotonic() by which the caller needs the answer, or None.

        Returns:
            A future of the Translation; it raises RequestError if decoding fails or the request
            is dropped. Cancel it to drop the request while it is still queued.

        Raises:
            RequestError: RESOURCE_EXHAUSTED when the queue is full or its expected wait exceeds
                max_queue_wait_s; DEADLINE_EXCEEDED when the deadline cannot be met;
                UNAVAILABLE when the engine is shutting down.
        """
        now = time.monotonic()
        with self._lock:
            reason = self._refusal(now, deadline)
            if reason is None:
                job = _Job(request, deadline, now)
                self._queue.append(job)
                self._lock.notify()
                return job.future
        self.observer.rejected(reason)
        raise _REFUSALS[reason](self.name, self.config)

    def _refusal(self, now: float, deadline: float | None) -> str | None:
        """Why a request arriving now would be refused, or None (caller holds the lock)."""
        if not self._accepting:
            return "shutting_down"
        if len(self._queue) >= self.config.max_queued:
            return "queue_full"
        wait = self.expected_wait(now)
        if wait > 0 and wait + self._own_batch_seconds() > self.config.max_queue_wait_s:
            return "queue_wait"
        if deadline is not None and now + wait >= deadline:
            return "deadline"
        return None

    def expected_wait(self, now: float | None = None) -> float:
        """Seconds a request queued now would wait before its batch starts (0 until measured)."""
        now = time.monotonic() if now is None else now
        full = self.cost.seconds(self.config.max_batch_size)
        if full is None:
            return 0.0
        remaining = 0.0
        if self._running is not None:
            started, size = self._running
            remaining = max(self.cost.seconds(size) - (now - started), 0.0)
        return remaining + len(self._queue) // self.config.max_batch_size * full

    def _own_batch_seconds(self) -> float:
        """Expected decode time of the batch a request queued now would join."""
        size = len(self._queue) % self.config.max_batch_size + 1
        return self.cost.seconds(size) or 0.0

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while requests are queued or a batch is decoding."""
        with self._lock:
            return bool(self._queue) or self._running is not None

    def stop_accepting(self) -> None:
        """Refuses new requests with UNAVAILABLE; accepted ones still finish."""
        with self._lock:
            self._accepting = False

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stops accepting, lets accepted requests finish for up to timeout_s, stops the thread.

        Requests still queued after the timeout get UNAVAILABLE. Returns True if all finished.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._accepting = False
            while (self._queue or self._running) and time.monotonic() < deadline:
                self._lock.wait(0.05)
            drained = not self._queue and self._running is None
            left, self._queue = list(self._queue), deque()
            self._stopped = True
            self._lock.notify_all()
        for job in left:
            _fail(job, RequestError(ErrorCode.UNAVAILABLE, f"model {self.name!r} is shutting down; retry"))
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        return drained

    def _loop(self) -> None:
        """The engine thread: take a batch when free, decode it, repeat until closed."""
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            if jobs:
                self._run_batch(jobs)

    def _take_batch(self) -> list[_Job] | None:
        """Waits for work; returns the next batch (may be empty after drops), None once closed."""
        with self._lock:
            while not self._queue and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            cfg = self.config
            if cfg.batch_wait_s > 0 and len(self._queue) < cfg.max_batch_size:
                until = self._queue[0].queued_at + cfg.batch_wait_s
                while len(self._queue) < cfg.max_batch_size and not self._stopped:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
            jobs, tokens, drops = [], 0, []
            now = time.monotonic()
            while self._queue and len(jobs) < cfg.max_batch_size:
                job = self._queue[0]
                if jobs and cfg.max_batch_tokens and tokens + job.tokens > cfg.max_batch_tokens:
                    break
                self._queue.popleft()
                reason = self._drop_reason(job, now, len(jobs) + 1)
                if reason:
                    drops.append((job, reason))
                    continue
                jobs.append(job)
                tokens += job.tokens
            if jobs:
                self._running = (now, len(jobs))
            queued = len(self._queue)
        for job, reason in drops:
            self.observer.dropped(reason)
            if reason == "deadline":
                _fail(job, RequestError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before decoding"))
        self.observer.queue_depth(queued)
        return jobs

    def _drop_reason(self, job: _Job, now: float, size: int) -> str | None:
        """Why a queued job must not be decoded: cancelled by its caller, or too late to finish."""
        if not job.future.set_running_or_notify_cancel():
            return "cancelled"
        if job.deadline is not None:
            expected = self.cost.seconds(size) or 0.0
            if now + expected >= job.deadline:
                return "deadline"
        return None

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Decodes one batch and completes its futures; never raises."""
        started = time.monotonic()
        try:
            results = self.translator.translate_batch([j.request for j in jobs])
        except Exception:  # translate_batch isolates request failures; this is a bug
            log.exception("engine %s failed on a batch of %d", self.name, len(jobs))
            results = [RequestError(ErrorCode.INTERNAL, "the model failed on this input")] * len(jobs)
        elapsed = time.monotonic() - started
        with self._lock:
            self.cost.observe(len(jobs), elapsed)
            self._running = None
            self._lock.notify_all()
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, Translation):
                job.future.set_result(result)
            else:
                job.future.set_exception(result)
        produced = sum(len(r.output_tokens) for r in results if isinstance(r, Translation))
        self.observer.batch([started - j.queued_at for j in jobs], elapsed, produced)


def start_engines(
    manifests: Iterable[Manifest],
    runtime: RuntimeConfig,
    settings: Callable[[str], EngineConfig],
    observer: Callable[[Manifest], EngineObserver | None] = lambda manifest: None,
) -> dict[str, Engine]:
    """An engine per model, each on its own thread.

    Args:
        manifests: the models to load.
        runtime: how their ONNX Runtime sessions are built.
        settings: a model name -> its batching and admission settings.
        observer: a manifest -> what records its engine's events (None records nothing).

    Returns:
        Engine per model name.
    """
    return {m.name: Engine(Translator(m, runtime), settings(m.name), observer(m)) for m in manifests}


def _fail(job: _Job, error: RequestError) -> None:
    """Completes a job's future with an error unless it is already done."""
    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
        job.future.set_exception(error)


_REFUSALS = {
    "shutting_down": lambda name, cfg: RequestError(
        ErrorCode.UNAVAILABLE, f"model {name!r} is shutting down; retry on another replica"
    ),
    "queue_full": lambda name, cfg: RequestError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"model {name!r} is overloaded ({cfg.max_queued} requests queued); retry with backoff",
    ),
    "queue_wait": lambda name, cfg: RequestError(
        ErrorCode.RESOURCE_EXHAUSTED,
        f"model {name!r} is overloaded (expected wait over {cfg.max_queue_wait_s:g} s); retry with backoff",
    ),
    "deadline": lambda name, cfg: RequestError(
        ErrorCode.DEADLINE_EXCEEDED, f"model {name!r} cannot answer before the call's deadline"
    ),
}
