"""An engine per model: one thread that owns the model, admits requests and decodes them step by step.

Callers (asyncio handlers, batch jobs, tests) `submit()` a prepared request and get a
`concurrent.futures.Future`. The engine thread keeps one running batch of decoder rows: before
every decoder step it encodes whatever is queued (up to `max_batch_size` rows in all, a beam
request taking beam-size rows) and merges it in, runs one step for every row, and answers each
request the moment it finishes, so a short request never waits for long ones (step-level, or
"continuous", batching). With `step_batching` off it behaves as a request-level batcher: a batch
is taken only when the previous one has finished.

What to admit, which requests join at each step and which to drop is decided by the engine's
`Scheduler` (core/scheduler.py) as plain data; the engine holds the lock and the thread and
carries those decisions out. Admission is decided in `submit()` without waiting, so an
overloaded model says no in microseconds instead of queueing for longer than a client would
wait. A request whose deadline passes or whose caller cancels it while queued is dropped
without decoding; one cancelled while decoding (a stream whose client went away) frees its rows
at the next step. No Ray, no protos.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from attnserve.core.decoding import DecodeJob, Hypothesis, RunningBatch
from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.requests import Answer, PreparedRequest, StreamCallback
from attnserve.core.scheduler import DecodeTime, EngineConfig, Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


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

    def answered(self, attention: np.ndarray, token_logprobs: np.ndarray | None) -> None:
        """A request finished: its cross attention (T, S) and, when scored, its tokens'
        log-probabilities (T,), for answer-quality signals (core/quality.py)."""


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

    def answered(self, attention: np.ndarray, token_logprobs: np.ndarray | None) -> None:
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
    """One admitted request and the future its caller waits on (a `Schedulable`)."""

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

    @property
    def abandoned(self) -> bool:
        """Its caller cancelled the future."""
        return self.future.abandoned


Finished = list[tuple[_Job, Hypothesis | None]]  # None: failed, dropped or abandoned


class Engine:
    """Runs one model's scheduler decisions on a thread of its own; thread-safe `submit()`.

    Args:
        runner: the model's sessions and codec.
        config: batching and admission settings.
        observer: what records the engine's events (None records nothing).
    """

    def __init__(self, runner: ModelRunner, config: EngineConfig = EngineConfig(), observer=None):
        self.runner = runner
        self.name = runner.manifest.name
        self.observer: EngineObserver = observer or _Silent()
        self.scheduler = Scheduler(config)
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config(self) -> EngineConfig:
        """The batching and admission settings in force."""
        return self.scheduler.config

    def reconfigure(self, config: EngineConfig) -> None:
        """Applies new batching and admission settings from the next step on."""
        with self._lock:
            self.scheduler.config = config
            self._lock.notify_all()

    def submit(
        self, request: PreparedRequest, deadline: float | None = None, on_token: StreamCallback | None = None
    ) -> Future:
        """Admits a request or refuses it at once.

        Args:
            request: a validated request.
            deadline: time.monotonic() by which the caller needs the answer, or None.
            on_token: called on the engine thread with each output token, its attention row (or
                None) and its log-probability (or None) as soon as it is chosen (a beam request's
                tokens come when it ends).

        Returns:
            A future of the Answer; it raises RequestError if decoding fails or the request
            is dropped. Cancel it to drop the request, queued or decoding.

        Raises:
            RequestError: RESOURCE_EXHAUSTED when the queue is full or its expected wait exceeds
                max_queue_wait_s; DEADLINE_EXCEEDED when the deadline cannot be met;
                UNAVAILABLE when the engine is shutting down.
        """
        now = time.monotonic()
        job = _Job(request, deadline, now, on_token)
        with self._lock:
            reason = self.scheduler.admit(job, now)
            if reason is None:
                self._lock.notify()
                return job.future
        self.observer.rejected(reason)
        raise _REFUSALS[reason](self.name, self.config)

    def warm_up(self) -> float:
        """Decodes the model's representative request alone, then as a full batch, so that the
        first real call finds the sessions warm; the decode-time estimate starts afresh after.

        Returns:
            The seconds it took.

        Raises:
            RequestError: if the model fails on its warm-up request.
        """
        started = time.monotonic()
        request = self.runner.warmup_request()
        for size in (1, self.config.max_batch_size):
            for answer in answer_all(self, [request] * size):
                if isinstance(answer, RequestError):
                    raise answer
        with self._lock:
            self.scheduler.cost = DecodeTime()
        return time.monotonic() - started

    @property
    def queued(self) -> int:
        """Requests waiting to join the running batch."""
        return self.scheduler.queued

    @property
    def busy(self) -> bool:
        """True while requests are queued or decoding."""
        with self._lock:
            return not self.scheduler.idle

    def stop_accepting(self) -> None:
        """Refuses new requests with UNAVAILABLE; accepted ones still finish."""
        with self._lock:
            self.scheduler.accepting = False

    def close(self, timeout_s: float = 10.0) -> bool:
        """Stops accepting, lets accepted requests finish for up to timeout_s, stops the thread.

        Requests not finished by then get UNAVAILABLE. Returns True if all finished.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self.scheduler.accepting = False
            while not self.scheduler.idle and time.monotonic() < deadline:
                self._lock.wait(0.05)
            drained = self.scheduler.idle
            left = self.scheduler.take_all()
            self._stopped = True
            self._lock.notify_all()
        for job in left:
            _fail(job, RequestError(ErrorCode.UNAVAILABLE, f"model {self.name!r} is shutting down; retry"))
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        return drained

    def _loop(self) -> None:
        """The engine thread: carry out the scheduler's decision, step, answer, repeat."""
        batch = self.runner.running_batch()
        while (decision := self._next_decision()) is not None:
            finished: Finished = [(job, None) for job in decision.abandoned]
            if decision.abandoned:
                batch.remove([job.decode for job in decision.abandoned])
            self._drop(decision)
            joining = [job for job in decision.join if job.future.set_running_or_notify_cancel()]
            finished += [(job, None) for job in decision.join if job not in joining]  # cancelled just now
            started = time.monotonic()
            if joining:
                finished += self._join(batch, joining)
            if batch.rows:
                rows = batch.rows
                try:
                    done = batch.step()
                except Exception:  # inputs are validated before they queue: this is a bug
                    log.exception("engine %s failed on a step of %d rows", self.name, rows)
                    done = [(job, None) for job in batch.jobs]
                    batch = self.runner.running_batch()
                    for job, _ in done:
                        _fail(job.tag, RequestError(ErrorCode.INTERNAL, "the model failed on this input"))
                tokens = int(sum(len(h.token_ids) for _, h in done if h is not None))
                finished += [(job.tag, h) for job, h in done]
                self._report_quality(done)
                waits = [started - j.queued_at for j in joining]
                self.observer.step(rows, waits, time.monotonic() - started, tokens)
            self._finish(finished, batch.jobs)

    def _report_quality(self, done: list[tuple[DecodeJob, Hypothesis | None]]) -> None:
        """Hands the observer what the answer-quality signals of the requests a step finished are
        read from (a failure to record them is logged, never the requests' failure)."""
        try:
            for _, hyp in done:
                if hyp is not None:
                    self.observer.answered(hyp.attention, hyp.token_logprobs)
        except Exception:
            log.exception("engine %s could not record answer-quality signals", self.name)

    def _next_decision(self) -> SchedulerOutput | None:
        """Waits until the scheduler has work for the next step; None once closed."""
        with self._lock:
            while not self._stopped:
                decision = self.scheduler.schedule(time.monotonic())
                if decision.wait_s is None:
                    return decision
                self._lock.wait(None if math.isinf(decision.wait_s) else decision.wait_s)
            return None

    def _drop(self, decision: SchedulerOutput) -> None:
        """Fails the queued requests the scheduler dropped (a cancelled one's caller is gone)."""
        for job, reason in decision.drop:
            self.observer.dropped(reason)
            if reason == "deadline":
                _fail(job, RequestError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed before decoding"))
        if decision.join or decision.drop:
            self.observer.queue_depth(decision.queued)

    def _join(self, batch: RunningBatch, jobs: list[_Job]) -> Finished:
        """Encodes the joining requests together and merges them into the batch; if that fails,
        each is tried alone so one bad request cannot fail the others. Returns those already done."""
        sample = self.config.quality_sample
        for job in jobs:
            job.decode = self.runner.job(job.request, job, job.on_token)
            job.decode.scores |= sample > 0 and random.random() < sample  # for the quality signals
        try:
            source = self.runner.source_batch([j.request for j in jobs])
            return [(d.tag, hyp) for d, hyp in batch.add([j.decode for j in jobs], source)]
        except Exception:
            if len(jobs) == 1:
                log.exception("encoding failed for a request of %d tokens", len(jobs[0].request.source_ids))
                _fail(jobs[0], RequestError(ErrorCode.INTERNAL, "the model failed on this input"))
                return [(jobs[0], None)]
            log.exception("encoding %d requests failed; trying them one by one", len(jobs))
            return [done for job in jobs for done in self._join(batch, [job])]

    def _finish(self, finished: Finished, running: list[DecodeJob]) -> None:
        """Answers finished requests and retires them from the scheduler."""
        if not finished:
            return
        for job, hyp in finished:
            if hyp is not None:
                try:
                    answer = self.runner.result(job.request, hyp, len(running) + len(finished))
                except Exception:  # a bug in building the answer fails this request, not the engine
                    log.exception("engine %s could not build an answer", self.name)
                    _fail(job, RequestError(ErrorCode.INTERNAL, "the answer could not be built"))
                    continue
                job.future.set_result(answer)
            elif job.abandoned:  # its caller is gone: nobody reads this
                self.observer.dropped("cancelled")
                _fail(job, RequestError(ErrorCode.UNAVAILABLE, "the request was cancelled"))
        with self._lock:
            self.scheduler.retire([(job, hyp is not None) for job, hyp in finished], time.monotonic())
            self._lock.notify_all()


def answer_all(engine: Engine, requests: Iterable[PreparedRequest]) -> Iterator[Answer | RequestError]:
    """Submits every request at once, then yields each one's answer, or its error, in order."""
    pending: list[Future | RequestError] = []
    for request in requests:
        try:
            pending.append(engine.submit(request))
        except RequestError as e:
            pending.append(e)
    for item in pending:
        if isinstance(item, RequestError):
            yield item
            continue
        try:
            yield item.result()
        except RequestError as e:
            yield e


def start_engine(
    manifest: Manifest, runtime: RuntimeConfig, config: EngineConfig, observer: EngineObserver | None = None
) -> Engine:
    """Loads one model's sessions and starts its engine thread: the one way an engine is built.

    Args:
        manifest: the model version to load.
        runtime: how its ONNX Runtime sessions are built.
        config: its batching and admission settings.
        observer: what records its engine's events (None records nothing).
    """
    return Engine(ModelRunner(manifest, runtime), config, observer)


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
