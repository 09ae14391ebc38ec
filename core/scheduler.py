"""The engine's policy as plain data: what to admit, which requests join the next step, what to drop.

`Scheduler` holds the queue, the requests in the running batch and the measured decode time. Its
answers are data that the engine thread carries out (vLLM's `schedule()` / `update_from_output()`
split): `admit()` says why a request must be refused, or queues it; `schedule()` says which
requests join the running batch at the next decoder step, which queued ones to drop, which running
ones their callers abandoned, or how long to wait for more; `retire()` takes finished requests out.
It reads no clock, holds no lock and runs no model, so tests drive it with plain objects and
chosen times. The caller serialises calls (the engine holds its lock).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

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
    quality_sample: the share of requests whose tokens are scored for the answer-quality signals
        even when they did not ask for scores (scoring costs about 6 % of a batch's time at B=32).
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 0
    batch_wait_s: float = 0.0
    max_queued: int = 1024
    max_queue_wait_s: float = 2.0
    step_batching: bool = True
    quality_sample: float = 0.0


class Schedulable(Protocol):
    """What the scheduler reads of a request (the engine's job; any object in tests)."""

    rows: int  # decoder rows it occupies (its beam size)
    tokens: int  # what it costs against a token budget
    queued_at: float  # clock seconds when it was admitted
    deadline: float | None  # clock seconds by which its caller needs the answer
    started: float  # clock seconds when it joined the running batch (set by the scheduler)

    @property
    def abandoned(self) -> bool:
        """Its caller cancelled it."""
        ...


@dataclass(frozen=True)
class SchedulerOutput:
    """What the engine does next.

    join: queued requests that join the running batch at the next step, in order.
    drop: queued requests dropped without decoding, with the reason ("cancelled", "deadline").
    abandoned: running requests whose callers went away; their rows are freed before the step.
    wait_s: None to act now; else nothing to do for up to this many seconds (math.inf: until a
        request arrives), then ask again.
    queued: requests still waiting after this decision.
    """

    join: tuple[Schedulable, ...] = ()
    drop: tuple[tuple[Schedulable, str], ...] = ()
    abandoned: tuple[Schedulable, ...] = ()
    wait_s: float | None = None
    queued: int = 0


class DecodeTime:
    """Running estimate of how long a request spends in the running batch."""

    def __init__(self, smoothing: float = COST_SMOOTHING):
        self.smoothing = smoothing
        self.seconds: float | None = None

    def observe(self, seconds: float) -> None:
        """Adds one finished request."""
        w = self.smoothing
        self.seconds = seconds if self.seconds is None else (1 - w) * self.seconds + w * seconds


class Scheduler:
    """Admission, join and drop decisions for one model's running batch.

    Args:
        config: the batching and admission settings (replace `config` to change them).
    """

    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.cost = DecodeTime()
        self.accepting = True
        self._queue: deque[Schedulable] = deque()
        self._queued_rows = 0
        self._running: list[Schedulable] = []
        self._running_rows = 0

    @property
    def queued(self) -> int:
        """Requests waiting to join the running batch."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """True when nothing is queued or decoding."""
        return not self._queue and not self._running

    def admit(self, job: Schedulable, now: float) -> str | None:
        """Queues a request, or says why it must be refused.

        Returns:
            None if queued; else "shutting_down", "queue_full", "queue_wait" (the expected wait
            and its own decoding exceed max_queue_wait_s) or "deadline" (it cannot join before
            its deadline).
        """
        if not self.accepting:
            return "shutting_down"
        if len(self._queue) >= self.config.max_queued:
            return "queue_full"
        wait = self.expected_wait(job.rows)
        if wait > 0 and wait + (self.cost.seconds or 0.0) > self.config.max_queue_wait_s:
            return "queue_wait"
        if job.deadline is not None and now + wait >= job.deadline:
            return "deadline"
        self._queue.append(job)
        self._queued_rows += job.rows
        return None

    def expected_wait(self, rows: int) -> float:
        """Seconds a request of `rows` rows queued now would wait to join (0 until measured):
        rows free up as requests finish, max_batch_size rows every decode time."""
        size, seconds = self.config.max_batch_size, self.cost.seconds
        if seconds is None:
            return 0.0
        if not self.config.step_batching:  # whole batches: the running one, then the queue's
            return (1 + (self._queued_rows + rows - 1) // size) * seconds if self._running else 0.0
        ahead = self._queued_rows + rows - max(size - self._running_rows, 0)
        return max(ahead, 0) / size * seconds

    def schedule(self, now: float) -> SchedulerOutput:
        """The decision before the next decoder step; the joining requests count as running."""
        if self.idle:
            return SchedulerOutput(wait_s=math.inf)
        cfg, running = self.config, self._running_rows
        if cfg.batch_wait_s > 0 and not running and self._queued_rows < cfg.max_batch_size:
            left = self._queue[0].queued_at + cfg.batch_wait_s - now
            if left > 0:  # an idle engine gathers a fuller first batch
                return SchedulerOutput(wait_s=left, queued=len(self._queue))
        room = cfg.max_batch_size - running
        if running and not cfg.step_batching:
            room = 0
        elif running and room < min(self._queued_rows, cfg.max_batch_size // JOIN_FRACTION):
            room = 0  # under load, join in groups: one encoder call per few rows costs less
        join: list[Schedulable] = []
        drop: list[tuple[Schedulable, str]] = []
        tokens = 0
        while self._queue and (self._queue[0].rows <= room or not (join or running)):
            job = self._queue[0]
            if join and cfg.max_batch_tokens and tokens + job.tokens > cfg.max_batch_tokens:
                break
            self._queue.popleft()
            self._queued_rows -= job.rows
            reason = self._drop_reason(job, now)
            if reason:
                drop.append((job, reason))
                continue
            job.started = now
            join.append(job)
            room -= job.rows
            tokens += job.tokens
        abandoned = tuple(j for j in self._running if j.abandoned)
        self._running += join
        self._running_rows += sum(j.rows for j in join)
        return SchedulerOutput(tuple(join), tuple(drop), abandoned, None, len(self._queue))

    def _drop_reason(self, job: Schedulable, now: float) -> str | None:
        """Why a queued request must not be decoded: cancelled by its caller, or too late to finish."""
        if job.abandoned:
            return "cancelled"
        if job.deadline is not None and now + (self.cost.seconds or 0.0) >= job.deadline:
            return "deadline"
        return None

    def retire(self, finished: list[tuple[Schedulable, bool]], now: float) -> None:
        """Takes finished requests out of the running batch; answered ones update the decode time.

        Args:
            finished: each request with True if it was answered (False: failed or abandoned).
            now: clock seconds.
        """
        for job, answered in finished:
            if answered:
                self.cost.observe(now - job.started)
        gone = {id(job) for job, _ in finished}
        self._running = [j for j in self._running if id(j) not in gone]
        self._running_rows = sum(j.rows for j in self._running)

    def take_all(self) -> list[Schedulable]:
        """Empties the queue and the running set (shutdown); returns what they held."""
        left = [*self._queue, *self._running]
        self._queue.clear()
        self._queued_rows = 0
        self._running, self._running_rows = [], 0
        return left
