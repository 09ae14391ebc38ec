"""The scheduler's policy alone: plain requests and chosen times, no model and no thread."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.scheduler import JOIN_FRACTION, DecodeTime, EngineConfig, Scheduler


@dataclass(eq=False)
class Request:
    """A `Schedulable` with nothing behind it."""

    rows: int = 1
    tokens: int = 10
    queued_at: float = 0.0
    deadline: float | None = None
    started: float = 0.0
    abandoned: bool = False


def _queue(scheduler: Scheduler, count: int, now: float = 0.0, **fields) -> list[Request]:
    """Admits `count` requests at `now`; all must be accepted."""
    requests = [Request(queued_at=now, **fields) for _ in range(count)]
    assert [scheduler.admit(r, now) for r in requests] == [None] * count
    return requests


def _finish(scheduler: Scheduler, requests, now: float) -> None:
    scheduler.retire([(r, True) for r in requests], now)


def test_an_idle_scheduler_waits_until_a_request_arrives():
    decision = Scheduler().schedule(0.0)
    assert decision.wait_s == math.inf and not decision.join


def test_the_first_requests_join_at_once_up_to_the_batch_size():
    scheduler = Scheduler(EngineConfig(max_batch_size=8))
    queued = _queue(scheduler, 20)
    decision = scheduler.schedule(1.0)
    assert decision.wait_s is None
    assert list(decision.join) == queued[:8] and decision.queued == 12
    assert all(r.started == 1.0 for r in decision.join)


def test_under_load_requests_join_once_a_fraction_of_the_rows_is_free():
    size = 16
    scheduler = Scheduler(EngineConfig(max_batch_size=size))
    _queue(scheduler, size)
    running = scheduler.schedule(0.0).join
    assert len(running) == size
    _queue(scheduler, 10)
    free = size // JOIN_FRACTION
    _finish(scheduler, running[: free - 1], 1.0)
    assert not scheduler.schedule(1.0).join  # fewer free rows than a group: wait for more
    _finish(scheduler, running[free - 1 : free], 2.0)
    assert len(scheduler.schedule(2.0).join) == free


def test_a_lone_queued_request_joins_a_running_batch_at_the_next_step():
    scheduler = Scheduler(EngineConfig(max_batch_size=8))
    _queue(scheduler, 7)
    assert len(scheduler.schedule(0.0).join) == 7
    (late,) = _queue(scheduler, 1, now=0.5)
    assert scheduler.schedule(0.5).join == (late,)


def test_request_level_batching_takes_a_batch_only_when_the_last_has_finished():
    scheduler = Scheduler(EngineConfig(max_batch_size=8, step_batching=False))
    _queue(scheduler, 20)
    sizes = []
    while not scheduler.idle:
        joined = scheduler.schedule(0.0).join
        sizes.append(len(joined))
        assert not scheduler.schedule(0.0).join  # nothing joins a running batch
        _finish(scheduler, joined, 0.0)
    assert sizes == [8, 8, 4]


def test_a_beam_request_takes_its_rows_and_waits_for_room():
    scheduler = Scheduler(EngineConfig(max_batch_size=8))
    greedy = _queue(scheduler, 6)
    (beam,) = _queue(scheduler, 1, rows=4)
    assert len(scheduler.schedule(0.0).join) == 6  # the beam's 4 rows do not fit beside them
    assert scheduler.queued == 1 and not scheduler.schedule(0.0).join
    _finish(scheduler, greedy[:2], 1.0)
    assert scheduler.schedule(1.0).join == (beam,)  # 2 + 2 free rows: room for its 4


def test_an_oversized_request_joins_an_empty_batch_alone():
    scheduler = Scheduler(EngineConfig(max_batch_size=4))
    (big,) = _queue(scheduler, 1, rows=6)
    assert scheduler.schedule(0.0).join == (big,)


def test_the_token_budget_limits_what_joins_at_one_step():
    scheduler = Scheduler(EngineConfig(max_batch_size=32, max_batch_tokens=100))
    _queue(scheduler, 10, tokens=30)
    assert len(scheduler.schedule(0.0).join) == 3
    assert len(scheduler.schedule(0.0).join) == 3  # the rest join at the following steps


def test_an_idle_engine_waits_for_a_fuller_first_batch_only_as_long_as_told():
    scheduler = Scheduler(EngineConfig(max_batch_size=8, batch_wait_s=0.01))
    _queue(scheduler, 3, now=1.0)
    assert scheduler.schedule(1.004).wait_s == pytest.approx(0.006)
    assert len(scheduler.schedule(1.011).join) == 3
    full = Scheduler(EngineConfig(max_batch_size=8, batch_wait_s=0.01))
    _queue(full, 8, now=1.0)
    assert len(full.schedule(1.0).join) == 8  # a full batch never waits


def test_the_queue_is_bounded_by_count():
    scheduler = Scheduler(EngineConfig(max_queued=3))
    _queue(scheduler, 3)
    assert scheduler.admit(Request(), 0.0) == "queue_full"


def test_the_queue_is_bounded_by_the_expected_wait():
    scheduler = Scheduler(EngineConfig(max_batch_size=1, max_queue_wait_s=0.9))
    _queue(scheduler, 1)
    scheduler.schedule(0.0)  # one request decoding
    scheduler.cost.seconds = 0.4  # as if measured: a request decodes in 0.4 s
    assert scheduler.expected_wait(1) == pytest.approx(0.4)
    assert scheduler.admit(Request(), 0.0) is None  # waits 0.4 s, then decodes 0.4 s
    assert scheduler.admit(Request(), 0.0) == "queue_wait"  # 0.8 s + 0.4 s: over 0.9 s


def test_a_request_that_joins_the_next_step_is_always_accepted():
    scheduler = Scheduler(EngineConfig(max_batch_size=8, max_queue_wait_s=0.1))
    scheduler.cost.seconds = 5.0  # decoding takes far longer than the queue bound
    assert scheduler.admit(Request(), 0.0) is None


def test_a_deadline_that_cannot_be_met_is_refused_at_once():
    scheduler = Scheduler(EngineConfig(max_batch_size=1, max_queue_wait_s=10))
    _queue(scheduler, 1)
    scheduler.schedule(0.0)
    scheduler.cost.seconds = 5.0
    assert scheduler.admit(Request(deadline=1.0), 0.0) == "deadline"
    assert scheduler.admit(Request(deadline=6.0), 0.0) is None


def test_no_request_is_admitted_after_shutdown_begins():
    scheduler = Scheduler()
    scheduler.accepting = False
    assert scheduler.admit(Request(), 0.0) == "shutting_down"


def test_queued_requests_past_their_deadline_or_cancelled_are_dropped_undecoded():
    scheduler = Scheduler(EngineConfig(max_batch_size=8))
    late, fine, gone = Request(deadline=0.05), Request(), Request()
    for r in (late, fine, gone):
        assert scheduler.admit(r, 0.0) is None
    gone.abandoned = True
    decision = scheduler.schedule(0.1)
    assert decision.join == (fine,)
    assert set(decision.drop) == {(late, "deadline"), (gone, "cancelled")}


def test_running_requests_whose_callers_went_away_are_named_until_retired():
    scheduler = Scheduler(EngineConfig(max_batch_size=8))
    kept, left = _queue(scheduler, 2)
    scheduler.schedule(0.0)
    left.abandoned = True
    assert scheduler.schedule(0.1).abandoned == (left,)
    scheduler.retire([(left, False)], 0.1)
    assert scheduler.schedule(0.2).abandoned == ()
    assert scheduler.cost.seconds is None  # an abandoned request says nothing of decode time
    _finish(scheduler, [kept], 0.3)
    assert scheduler.cost.seconds == pytest.approx(0.3) and scheduler.idle


def test_take_all_empties_the_queue_and_the_running_set():
    scheduler = Scheduler(EngineConfig(max_batch_size=2))
    requests = _queue(scheduler, 5)
    scheduler.schedule(0.0)
    assert set(scheduler.take_all()) == set(requests) and scheduler.idle


def test_decode_time_is_a_running_average():
    cost = DecodeTime(smoothing=0.5)
    assert cost.seconds is None
    cost.observe(0.4)
    assert cost.seconds == pytest.approx(0.4)
    cost.observe(0.2)
    assert cost.seconds == pytest.approx(0.3)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("arrive"), st.integers(1, 5), st.integers(1, 200)),
            st.tuples(st.just("finish"), st.integers(0, 50), st.just(0)),
            st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0)),
            st.tuples(st.just("step"), st.just(0), st.just(0)),
        ),
        max_size=80,
    ),
    size=st.integers(1, 16),
    budget=st.sampled_from([0, 100, 400]),
    step_batching=st.booleans(),
)
def test_every_admitted_request_joins_once_in_order_within_the_batch_size(
    events, size, budget, step_batching
):
    config = EngineConfig(max_batch_size=size, max_batch_tokens=budget, step_batching=step_batching)
    scheduler = Scheduler(config)
    admitted, joined, dropped, running = [], [], [], []
    for now, (kind, value, tokens) in enumerate(events):
        if kind == "arrive":
            request = Request(rows=value, tokens=tokens, queued_at=now)
            if scheduler.admit(request, now) is None:
                admitted.append(request)
        elif kind == "finish" and running:
            done = running.pop(value % len(running))
            scheduler.retire([(done, True)], now)
        elif kind == "cancel" and admitted:
            admitted[value % len(admitted)].abandoned = True
        else:
            decision = scheduler.schedule(now)
            gone = set(decision.abandoned)
            scheduler.retire([(r, False) for r in gone], now)
            running = [r for r in running if r not in gone] + list(decision.join)
            joined += decision.join
            dropped += [r for r, _ in decision.drop]
            assert not any(r.abandoned for r in decision.join)
            rows = sum(r.rows for r in running)
            assert rows <= size or len(running) == 1  # only a lone oversized request exceeds it
            if budget and len(decision.join) > 1:
                assert sum(r.tokens for r in decision.join) <= budget
    order = {id(r): i for i, r in enumerate(admitted)}
    taken = [order[id(r)] for r in joined + dropped]
    assert len(set(taken)) == len(taken)  # nothing joins twice or both joins and drops
    assert [order[id(r)] for r in joined] == sorted(order[id(r)] for r in joined)  # first come, first served
    assert scheduler.queued == len(admitted) - len(taken)
