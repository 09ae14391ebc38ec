"""Load generators on one asyncio loop: closed loop (N workers back to back) and open loop (Poisson).

A `Call` takes an input index and returns (status code name, batch size); it never raises for a
refused or failed call, so the generators only count and time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

Call = Callable[[int], Awaitable[tuple[str, int]]]


@dataclass(frozen=True)
class Outcome:
    """One call: when it was sent (perf_counter s), how long it took, its status and batch size."""

    sent: float
    seconds: float
    code: str
    batch_size: int
    lag: float = 0.0  # open loop: how late it was sent after its scheduled arrival


@dataclass(frozen=True)
class OpenLoopResult:
    """What an open-loop run did: every call, and the arrival rate it meant and achieved."""

    outcomes: tuple[Outcome, ...]
    intended_rate: float
    achieved_rate: float
    started: float  # perf_counter s of the first scheduled arrival
    ended: float  # perf_counter s when the last call was sent
    max_in_flight: int


async def timed(call: Call, index: int, lag: float = 0.0) -> Outcome:
    """Runs one call and times it."""
    sent = time.perf_counter()
    code, batch = await call(index)
    return Outcome(sent, time.perf_counter() - sent, code, batch, lag)


async def closed_loop(call: Call, concurrency: int, total: int, max_seconds: float = float("inf")):
    """`concurrency` workers send calls back to back until `total` are done or time is up.

    Args:
        call: the call to make; its argument counts up from 0.
        concurrency: workers (calls in flight).
        total: calls at most.
        max_seconds: no call is started after this many seconds.

    Returns:
        (outcomes in completion order, wall seconds).
    """
    outcomes: list[Outcome] = []
    counter = iter(range(total))
    started = time.perf_counter()
    stop_at = started + max_seconds

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() >= stop_at:
                return
            outcomes.append(await timed(call, i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


def poisson_arrivals(rate: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets (s, ascending) of a Poisson process of `rate` per second over `seconds`.

    Args:
        rate: mean arrivals per second (> 0).
        seconds: length of the window.
        seed: the random seed.

    Returns:
        (N,) float64 offsets in [0, seconds).
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 1.5) + 16)
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # very unlikely: draw more
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=len(gaps)))])
    return times[times < seconds]


async def open_loop(call: Call, arrivals: np.ndarray, on_sent: Callable[[], None] | None = None):
    """Sends one call at each arrival offset without waiting for answers; waits for all at the end.

    A call due while the loop is behind is sent at once (its lag is recorded), so a slow server
    never slows the arrivals; a slow generator shows as an achieved rate below the intended one.

    Args:
        call: the call to make; its argument counts up from 0.
        arrivals: offsets in seconds from the start, ascending.
        on_sent: called once right after the last call was sent (e.g. to start a probe).

    Returns:
        An OpenLoopResult.
    """
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task] = []
    in_flight, peak = 0, 0

    def done(_: asyncio.Task) -> None:
        nonlocal in_flight
        in_flight -= 1

    start = time.perf_counter()
    for i, offset in zip(itertools.count(), arrivals, strict=False):
        delay = start + offset - time.perf_counter()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = loop.create_task(timed(call, i, max(time.perf_counter() - start - offset, 0.0)))
        task.add_done_callback(done)
        tasks.append(task)
        in_flight += 1
        peak = max(peak, in_flight)
    ended = time.perf_counter()
    if on_sent:
        on_sent()
    outcomes = await asyncio.gather(*tasks)
    window = float(arrivals[-1]) if len(arrivals) else 0.0
    intended = len(arrivals) / window if window else 0.0
    achieved = len(arrivals) / (ended - start) if ended > start else 0.0
    return OpenLoopResult(tuple(outcomes), intended, achieved, start, ended, peak)


async def loop_lag(stop: asyncio.Event, period_s: float = 0.01) -> list[float]:
    """How late this event loop wakes from `period_s` sleeps until `stop` is set (seconds each).

    A load generator whose loop is late adds that much to every latency it measures.
    """
    lags = []
    while not stop.is_set():
        due = time.perf_counter() + period_s
        await asyncio.sleep(period_s)
        lags.append(max(time.perf_counter() - due, 0.0))
    return lags


def percentiles_ms(seconds: list[float], *qs: float) -> tuple[float | None, ...]:
    """The given percentiles of durations in milliseconds (None each when there are none)."""
    if not seconds:
        return tuple(None for _ in qs)
    ms = np.asarray(seconds) * 1000
    return tuple(round(float(np.percentile(ms, q)), 2) for q in qs)


@dataclass(frozen=True)
class Latency:
    """How many calls, and their p50 and p99 in milliseconds (None when there are none)."""

    count: int
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        return cls(len(seconds), *percentiles_ms(seconds, 50, 99))


def codes(outcomes) -> dict[str, int]:
    """How many outcomes ended with each status code."""
    return dict(Counter(o.code for o in outcomes))


def recovery_seconds(probes: list[Outcome], since: float, threshold_s: float, run: int = 3) -> float | None:
    """Seconds from `since` until the first of `run` consecutive probes all within the threshold.

    Args:
        probes: sequential probe calls in sending order.
        since: perf_counter s the clock starts at (the end of the storm).
        threshold_s: the latency a recovered service answers within.
        run: consecutive good probes needed, so one lucky probe does not count.

    Returns:
        Seconds (0 if already recovered at `since`), or None if it never recovered.
    """
    streak = 0
    for i, probe in enumerate(probes):
        streak = streak + 1 if probe.code == "OK" and probe.seconds <= threshold_s else 0
        if streak == run:
            return round(max(probes[i - run + 1].sent - since, 0.0), 3)
    return None
