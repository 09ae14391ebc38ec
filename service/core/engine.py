"""An engine per model: one thread that owns the model, admits requests and decodes them step by step.

Callers (asyncio handlers, batch jobs, tests) `submit()` a prepared request and get a
`concurrent.futures.Future`. The engine thread keeps one running batch of decoder rows: before
every decoder step it encodes whatever is queued (up to `max_batch_size` rows in all, a beam
request taking beam-size rows) and merges it in, runs one step for every row, and answers each
request the moment it finishes, so a short request never waits for long ones (step-level, or
"continuous", batching). With `step_batching` off it behaves as a request-level batcher: a batch
is taken only when the previous one has finished.

Admission is decided in `submit()` without waiting: the queue is bounded by count and by the
wait the engine expects (from the measured time requests spend decoding and how many rows are
free), so an overloaded model says no in microseconds instead of queueing for longer than a
client would wait. A request whose deadline passes or whose caller cancels it while queued is
dropped without decoding; one cancelled while decoding (a stream whose client went away) frees
its rows at the next step. No Ray, no protos.
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

from attnserve.service.core.decoding import DecodeJob, RunningBatch
from attnserve.service.core.errors import ErrorCode, RequestError
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.onnx_model import RuntimeConfig
from attnserve.service.core.translation import PreparedRequest, StreamCallback, Translator

log = logging.getLogger(__name__)
COST_SMOOTHING = 0.1  # weight of the newest request in the running estimate of decode time
JOIN_FRACTION = 4  # with more queued than free rows, requests join once 1/4 of the rows are free


@dataclass(frozen=True)
class EngineConfig:
    """Batching and admission settings of one model's engine (changeable while it runs).

    max_batch_size: decoder rows in the running batch at most (a beam request takes beam-size rows).
    max_batch_tokens: 0 for no budget; else the most (source + output limit) x beam tokens that
        join the batch at one step.
    batch_wait_s: how long an idle engine waits for more requests before its first step (0: never).
    max_queued: requests waiting at most; beyond it RESOURCE_EXHAUSTED.
    max_queue_wait_s: the longest the engine expects a request it accepts to wait, counting its
        own decoding, judged from measured decode times; beyond it RESOURCE_EXHAUSTED. A request
        that would join the next step is always accepted.
    step_batching: requests join and leave the running batch at every step; off, a batch is
        taken only when the previous one has finished (request-level batching, for comparison).
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 0
    batch_wait_s: float = 0.0
    max_queued: int = 1024
    max_queue_wait_s: float = 2.0
    step_batching: bool = True


class EngineObserver(Protocol):
    """What the engine reports; the service records it as metrics. Called from any thread."""

    def rejected(self, reason: str) -> None:
        """A request was refused at admission (queue_full, queue_wait, deadline, shutting_down)."""

    def dropped(self, reason: str) -> None:
        """A queued request was dropped without decoding (deadline, cancelled)."""

    def step(self, rows: int, waits: list[float], seconds: float, output_tokens: int) -> None:
        """A decoder step ran over `rows` rows: the queue waits of the requests that joined at
        it, its time (their encoding included) and the output tokens of the requests it finished."""

    def queue_depth(self, queued: int) -> None:
        """Requests waiting after requests joined the running batch."""


class _Silent:
    """An observer that records nothing."""

    def rejected(self, reason: str) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def step(self, rows: int, waits: list[float], seconds: float, output_tokens: int) -> None:
        pass

    def queue_depth(self, queued: int) -> None:
        pass


class EngineFuture(Future):
    """A request's future; cancelling it while the request decodes frees its rows at the next step."""

    abandoned = False

    def cancel(self) -> bool:
        """Cancels a queued request, or asks the engine to stop decoding a running one."""
        self.abandoned = True
        return super().cancel()


@dataclass(eq=False)
class _Job:
    """One admitted request and the future its caller waits on."""

    request: PreparedRequest
    deadline: float | None  # time.monotonic() seconds
    queued_at: float
    on_token: StreamCallback | None = None
    future: EngineFuture = field(default_factory=EngineFuture)
    started: float = 0.0
    decode: DecodeJob | None = None  # its rows' job once it joins the running batch

    @property
    def rows(self) -> int:
        """Decoder rows the request occupies."""
        return self.request.beam_size

    @property
    def tokens(self) -> int:
        """What the request costs against a token budget."""
        r = self.request
        return (len(r.source_ids) + r.max_output_tokens) * r.beam_size


class DecodeTime:
    """Running estimate of how long a request spends in the running batch."""

    def __init__(self, smoothing: float = COST_SMOOTHING):
        self.smoothing = smoothing
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        """Adds one finished request."""
        w = self.smoothing
        self.seconds = seconds if self.seconds is None else (1 - w) * self.seconds + w * seconds


class Engine:
    """Owns one model's Translator on a thread of its own; thread-safe `submit()`."""

    def __init__(self, translator: Translator, config: EngineConfig = EngineConfig(), observer=None):
        self.translator = translator
        self.name = translator.manifest.name
        self.config = config
        self.observer: EngineObserver = observer or _Silent()
        self.cost = DecodeTime()
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        self._lock = threading.Condition()
        self._running: list[_Job] = []  # requests in the running batch
        self._running_rows = 0
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def reconfigure(self, config: EngineConfig) -> None:
        """Applies new batching and admission settings from the next step on."""
        with self._lock:
            self.config = config
            self._lock.notify_all()

    def submit(
        self, request: PreparedRequest, deadline: float | None = None, on_token: StreamCallback | None = None
    ) -> Future:
        """Admits a request or refuses it at once.

        Args:
            request: a validated request.
            deadline: time.monotonic() by which the caller needs the answer, or None.
            on_token: called on the engine thread with each output token and its attention row
                (or None) as soon as it is chosen (a beam request's tokens come when it ends).

        Returns:
            A future of the Translation; it raises RequestError if decoding fails or the request
            is dropped. Cancel it to drop the request, queued or decoding.

        Raises:
            RequestError: RESOURCE_EXHAUSTED when the queue is full or its expected wait exceeds
                max_queue_wait_s; DEADLINE_EXCEEDED when the deadline cannot be met;
                UNAVAILABLE when the engine is shutting down.
        """
        now = time.monotonic()
        with self._lock:
            reason = self._refusal(now, deadline, request.beam_size)
            if reason is None:
                job = _Job(request, deadline, now, on_token)
                self._queue.append(job)
                self._queued_rows += job.rows
                self._lock.notify()
                return job.future
        self.observer.rejected(reason)
        raise _REFUSALS[reason](self.name, self.config)

    def _refusal(self, now: float, deadline: float | None, rows: int) -> str | None:
        """Why a request arriving now would be refused, or None (caller holds the lock)."""
        if not self._accepting:
            return "shutting_down"
        if len(self._queue) >= self.config.max_queued:
            return "queue_full"
        wait = self._expected_wait(rows)
        own = self.cost.seconds or 0.0
        if wait > 0 and wait + own > self.config.max_queue_wait_s:
            return "queue_wait"
        if deadline is not None and now + wait >= deadline:
            return "deadline"
        return None

    def _expected_wait(self, rows: int) -> float:
        """Seconds a request of `rows` rows queued now would wait to join (0 until measured):
        rows free up as requests finish, max_batch_size rows every decode time."""
        size, seconds = self.config.max_batch_size, self.cost.seconds
        if seconds is None:
            return 0.0
        if not self.config.step_batching:  # whole batches: the running one, then the queue's
            return (1 + (self._queued_rows + rows - 1) // size) * seconds if self._running else 0.0
        ahead = self._queued_rows + rows - max(size - self._running_rows, 0)
        return max(ahead, 0) / size * seconds

    @property
    def queued(self) -> int:
        """Requests waiting to join the running batch."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """True while requests are queued or decoding."""
        with self._lock:
            return bool(self._queue) or bool(self._running)

    def stop_accepting(self) -> None:
        """Refuses new requests with UNAVAILABLE; accepted ones still finish."""
        with self._lock:
            self._accepting = False

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stops accepting, lets accepted requests finish for up to timeout_s, stops the thread.

        Requests not finished by then get UNAVAILABLE. Returns True if all finished.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._accepting = False
            while (self._queue or self._running) and time.monotonic() < deadline:
                self._lock.wait(0.05)
            drained = not self._queue and not self._running
            left, self._queue = [*self._queue, *self._running], deque()
            self._stopped = True
            self._lock.notify_all()
        for job in left:
            _fail(job, RequestError(ErrorCode.UNAVAILABLE, f"model {self.name!r} is shutting down; retry"))
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        return drained

    def _loop(self) -> None:
        """The engine thread: merge what is queued into the running batch, step, repeat."""
        batch = self.translator.running_batch()
        while True:
            taken = self._take(batch.rows)
            if taken is None:
                return
            joining, cancelled = taken
            if cancelled:
                batch.remove([job.decode for job in cancelled])
                self._finish([(job, None) for job in cancelled], batch)
            started = time.monotonic()
            waits = [started - j.queued_at for j in joining]
            finished = self._join(batch, joining, started) if joining else []
            if batch.rows:
                rows = batch.rows
                try:
                    done = batch.step()
                except Exception:  # inputs are validated before they queue: this is a bug
                    log.exception("engine %s failed on a step of %d rows", self.name, rows)
                    done = [(job, None) for job in batch.jobs]
                    batch = self.translator.running_batch()
                    for job, _ in done:
                        _fail(job.tag, RequestError(ErrorCode.INTERNAL, "the model failed on this input"))
                tokens = int(sum(len(h.token_ids) for _, h in done if h is not None))
                finished += [(job.tag, h) for job, h in done]
                self.observer.step(rows, waits, time.monotonic() - started, tokens)
            self._finish(finished, batch)

    def _take(self, running_rows: int) -> tuple[list[_Job], list[_Job]] | None:
        """Waits for work; returns the requests that join at the next step and the running ones
        their callers cancelled; None once closed."""
        with self._lock:
            while not self._queue and not self._running and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            cfg = self.config
            room = cfg.max_batch_size - running_rows
            if running_rows and not cfg.step_batching:
                room = 0
            elif running_rows and room < min(self._queued_rows, cfg.max_batch_size // JOIN_FRACTION):
                room = 0  # under load, join in groups: one encoder call per few rows costs less
            if cfg.batch_wait_s > 0 and not running_rows and self._queued_rows < cfg.max_batch_size:
                until = self._queue[0].queued_at + cfg.batch_wait_s
                while self._queued_rows < cfg.max_batch_size and not self._stopped:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
            jobs, tokens, drops = [], 0, []
            now = time.monotonic()
            while self._queue and (self._queue[0].rows <= room or not (jobs or running_rows)):
                job = self._queue[0]
                if jobs and cfg.max_batch_tokens and tokens + job.tokens > cfg.max_batch_tokens:
                    break
                self._queue.popleft()
                self._queued_rows -= job.rows
                reason = self._drop_reason(job, now)
                if reason:
                    drops.append((job, reason))
                    continue
                jobs.append(job)
                room -= job.rows
                tokens += job.tokens
            cancelled = [j for j in self._running if j.future.abandoned]
            self._running += jobs
            self._running_rows += sum(j.rows for j in jobs)
            queued = len(self._queue)
        for job, reason in drops:
            self.observer.dropped(reason)
            if reason == "deadline":
                _fail(job, RequestError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before decoding"))
        if jobs or drops:
            self.observer.queue_depth(queued)
        return jobs, cancelled

    def _drop_reason(self, job: _Job, now: float) -> str | None:
        """Why a queued job must not be decoded: cancelled by its caller, or too late to finish."""
        if not job.future.set_running_or_notify_cancel():
            return "cancelled"
        if job.deadline is not None and now + (self.cost.seconds or 0.0) >= job.deadline:
            return "deadline"
        return None

    def _join(self, batch: RunningBatch, jobs: list[_Job], now: float) -> list:
        """Encodes the joining requests together and merges them into the batch; if that fails,
        each is tried alone so one bad request cannot fail the others. Returns those already done."""
        for job in jobs:
            job.started = now
            job.decode = self.translator.job(job.request, job, job.on_token)
        try:
            source = self.translator.source_batch([j.request for j in jobs])
            return [(d.tag, hyp) for d, hyp in batch.add([j.decode for j in jobs], source)]
        except Exception:
            if len(jobs) == 1:
                log.exception("encoding failed for a request of %d tokens", len(jobs[0].request.source_ids))
                _fail(jobs[0], RequestError(ErrorCode.INTERNAL, "the model failed on this input"))
                return [(jobs[0], None)]
            log.exception("encoding %d requests failed; trying them one by one", len(jobs))
            return [done for job in jobs for done in self._join(batch, [job], now)]

    def _finish(self, finished: list, batch: RunningBatch) -> None:
        """Answers finished requests and removes them from the running set."""
        if not finished:
            return
        now = time.monotonic()
        for job, hyp in finished:
            if hyp is not None:
                job.future.set_result(
                    self.translator.result(job.request, hyp, len(batch.jobs) + len(finished))
                )
                self.cost.observe(now - job.started)
            elif job.future.abandoned:  # its caller is gone: nobody reads this
                self.observer.dropped("cancelled")
                _fail(job, RequestError(ErrorCode.UNAVAILABLE, "the request was cancelled"))
        with self._lock:
            gone = {id(job) for job, _ in finished}
            self._running = [j for j in self._running if id(j) not in gone]
            self._running_rows = sum(j.rows for j in self._running)
            self._lock.notify_all()


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
