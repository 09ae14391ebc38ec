"""The engine carrying out its scheduler's decisions on a real model: batched == alone, refusals as
errors, deadlines, cancellation, streaming, drain (the policy alone: test_scheduler.py)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.engine import Engine
from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from attnserve.core.scheduler import EngineConfig
from attnserve.models.g2p_data import load_split
from tests.helpers import answers

WORDS = [e.word for e in load_split("test")[:400]]


@pytest.fixture(scope="module")
def runner(bundled_manifest):
    return ModelRunner(bundled_manifest)


class GatedBatch:
    """A real RunningBatch whose steps wait for the test: `gate` open lets every step run,
    `steps` releases them one at a time; records the rows of every step."""

    def __init__(self, inner, owner):
        self.inner, self.owner = inner, owner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def add(self, jobs, source):
        return self.inner.add(jobs, source)

    @property
    def rows(self):
        return self.inner.rows

    def step(self):
        self.owner.started.set()
        if not self.owner.gate.is_set():
            self.owner.steps.acquire(timeout=10)
        self.owner.rows.append(self.inner.rows)
        self.owner.decoded += [job.tag.request for job in self.inner.jobs if job.tag is not None]
        return self.inner.step()


class Gated:
    """The real ModelRunner, with running batches that step when the test says."""

    def __init__(self, runner: ModelRunner):
        self.inner = runner
        self.manifest, self.codec, self.model = runner.manifest, runner.codec, runner.model
        self.gate = threading.Event()
        self.steps = threading.Semaphore(0)
        self.started = threading.Event()
        self.rows: list[int] = []
        self.decoded: list = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def running_batch(self):
        return GatedBatch(self.inner.running_batch(), self)


class Recorder:
    """An observer that keeps what the engine reported."""

    def __init__(self):
        self.rejections, self.drops, self.rows, self.joined = [], [], [], []

    def rejected(self, reason):
        self.rejections.append(reason)

    def dropped(self, reason):
        self.drops.append(reason)

    def step(self, rows, waits, seconds, output_tokens):
        self.rows.append(rows)
        self.joined.append(len(waits))

    def queue_depth(self, queued):
        pass


def _prepare(runner, word, attention=AttentionMode.CROSS, beam_size=1, max_output_tokens=0):
    return runner.codec.prepare(word, attention, max_output_tokens, beam_size=beam_size)


def _busy(runner, config: EngineConfig):
    """An engine whose first request is held at its first step: (gated, recorder, engine, its future)."""
    gated, recorder = Gated(runner), Recorder()
    engine = Engine(gated, config, recorder)
    running = engine.submit(_prepare(gated, "busy"))
    assert gated.started.wait(5)
    return gated, recorder, engine, running


@settings(max_examples=8, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(WORDS) - 1), min_size=1, max_size=40),
    beams=st.lists(st.sampled_from([1, 1, 1, 3]), min_size=40, max_size=40),
    max_batch=st.integers(1, 16),
    seed=st.integers(0, 1000),
)
def test_batched_answers_equal_decoding_alone(runner, picks, beams, max_batch, seed):
    engine = Engine(runner, EngineConfig(max_batch_size=max_batch))
    rng = random.Random(seed)
    requests = [_prepare(runner, WORDS[i], beam_size=b) for i, b in zip(picks, beams, strict=False)]
    futures = []
    try:
        for r in requests:  # random arrival times, so batches form differently each example
            futures.append(engine.submit(r))
            time.sleep(rng.choice([0, 0, 0.0005, 0.002]))
        got = [f.result(30) for f in futures]
    finally:
        engine.close()
    for request, result in zip(requests, got, strict=True):
        (alone,) = answers(runner, [request])
        assert result.output_tokens == alone.output_tokens
        assert result.attention.shape == alone.attention.shape
        assert abs(result.attention - alone.attention).max() < 1e-4


def _twenty_queued_behind_one(runner, config: EngineConfig) -> Recorder:
    """Decodes one request, held at its first step while 20 more queue; what the engine reported."""
    gated, recorder = Gated(runner), Recorder()
    engine = Engine(gated, config, recorder)
    first = engine.submit(_prepare(gated, "first"))
    assert gated.started.wait(5)
    rest = [engine.submit(_prepare(gated, w)) for w in WORDS[:20]]
    gated.gate.set()
    gated.steps.release()
    for f in [first, *rest]:
        f.result(30)
    engine.close()
    return recorder


def test_requests_join_the_running_batch_at_the_next_step(runner):
    recorder = _twenty_queued_behind_one(runner, EngineConfig(max_batch_size=8))
    assert recorder.joined[:2] == [1, 7]  # the queue joined at the second step, up to 8 rows
    assert max(recorder.rows) == 8 and sum(recorder.joined) == 21
    assert recorder.rows[1] == 8  # the first request decodes on with the seven that joined it


def test_a_short_request_finishes_within_steps_while_long_ones_decode(runner):
    gated, recorder = Gated(runner), Recorder()
    engine = Engine(gated, EngineConfig(max_batch_size=32), recorder)
    long = [engine.submit(_prepare(gated, w, max_output_tokens=30)) for w in WORDS[:16]]
    assert gated.started.wait(5)
    for _ in range(3):  # three steps of the long ones
        gated.steps.release()
    while len(gated.rows) < 3:
        time.sleep(0.001)
    short = engine.submit(_prepare(gated, "cat", max_output_tokens=2))
    steps_before = len(gated.rows)
    answered_at = []  # the step count when the engine thread answered it
    short.add_done_callback(lambda _: answered_at.append(len(gated.rows)))
    gated.gate.set()
    gated.steps.release()
    short.result(30)
    steps_for_short = answered_at[0] - steps_before
    assert steps_for_short <= 4 and all(not f.done() or len(f.result().output_tokens) for f in long)
    assert sum(not f.done() for f in long) > 0 or len(gated.rows) > steps_for_short + 3
    for f in long:
        f.result(30)
    engine.close()


def test_request_level_batching_takes_a_batch_only_when_the_last_has_finished(runner):
    recorder = _twenty_queued_behind_one(runner, EngineConfig(max_batch_size=8, step_batching=False))
    assert [j for j in recorder.joined if j] == [1, 8, 8, 4]


def test_queue_is_bounded_by_count(runner):
    gated, recorder, engine, running = _busy(runner, EngineConfig(max_batch_size=1, max_queued=3))
    queued = [engine.submit(_prepare(gated, w)) for w in ("one", "two", "three")]
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "four"))
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "3 requests queued" in info.value.message
    assert recorder.rejections == ["queue_full"]
    gated.gate.set()
    gated.steps.release()
    assert all(f.result(30).output_tokens for f in [running, *queued])
    engine.close()


def test_queue_is_bounded_by_expected_wait(runner):
    gated, recorder, engine, running = _busy(runner, EngineConfig(max_batch_size=1, max_queue_wait_s=0.9))
    engine.scheduler.cost.seconds = 0.4  # as if measured: a request decodes in 0.4 s
    accepted = [engine.submit(_prepare(gated, "a"))]  # waits ~0.4 s for the running one, then its own 0.4 s
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "b"))  # ~0.8 s + its own 0.4 s: over 0.9 s
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED and "expected wait" in info.value.message
    assert recorder.rejections == ["queue_wait"]
    gated.gate.set()
    gated.steps.release()
    for f in [running, *accepted]:
        f.result(30)
    engine.close()


def test_a_deadline_that_passes_in_the_queue_drops_the_request_undecoded(runner):
    gated, recorder, engine, running = _busy(runner, EngineConfig(max_batch_size=1))
    late = _prepare(gated, "late")
    doomed = engine.submit(late, deadline=time.monotonic() + 0.05)
    fine = engine.submit(_prepare(gated, "fine"))
    time.sleep(0.1)
    gated.gate.set()
    gated.steps.release()
    with pytest.raises(RequestError) as info:
        doomed.result(30)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert fine.result(30).output_tokens and running.result(30).output_tokens
    engine.close()
    assert all(late is not r for r in gated.decoded)
    assert recorder.drops == ["deadline"]


def test_a_deadline_that_cannot_be_met_is_refused_at_once(runner):
    gated, _, engine, busy = _busy(runner, EngineConfig(max_batch_size=1, max_queue_wait_s=10))
    engine.scheduler.cost.seconds = 5.0  # as if measured: a request decodes in 5 s
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(runner, "soon"), deadline=time.monotonic() + 1.0)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    gated.gate.set()
    gated.steps.release()
    busy.result(30)
    engine.close()


def test_a_cancelled_request_is_not_decoded(runner):
    gated, recorder, engine, running = _busy(runner, EngineConfig(max_batch_size=1))
    request = _prepare(gated, "cancelled")
    cancelled = engine.submit(request)
    kept = engine.submit(_prepare(gated, "kept"))
    assert cancelled.cancel()
    gated.gate.set()
    gated.steps.release()
    assert kept.result(30).output_tokens and running.result(30).output_tokens
    with pytest.raises(CancelledError):
        cancelled.result(0)
    engine.close()
    assert all(request is not r for r in gated.decoded)
    assert recorder.drops == ["cancelled"]


def test_a_request_cancelled_while_decoding_leaves_at_the_next_step(runner):
    gated, recorder = Gated(runner), Recorder()
    engine = Engine(gated, EngineConfig(max_batch_size=8), recorder)
    kept = engine.submit(_prepare(gated, "abracadabra"))
    assert gated.started.wait(5)
    cancelled = engine.submit(_prepare(gated, "encyclopedia"))
    gated.steps.release()  # step 1: the first alone; the second joins at step 2
    gated.steps.release()
    while len(gated.rows) < 2:
        time.sleep(0.001)
    seen = len(gated.rows)
    cancelled.cancel()
    gated.gate.set()
    gated.steps.release()
    assert kept.result(30).output_tokens
    engine.close()
    assert recorder.drops == ["cancelled"]
    assert gated.rows[1] == 2 and gated.rows[seen + 1] == 1  # gone at most one step after


def test_streamed_tokens_are_the_answer_with_its_attention(runner):
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    streams = {w: [] for w in WORDS[:6]}
    futures = {
        w: engine.submit(_prepare(runner, w), on_token=lambda t, w=w: streams[w].append(t)) for w in streams
    }
    for word, future in futures.items():
        result = future.result(30)
        assert [t.token for t in streams[word]] == list(result.output_tokens)
        assert "".join(t.text for t in streams[word]) == result.text
        rows = np.stack([t.attention for t in streams[word]])
        np.testing.assert_allclose(rows, result.attention, atol=1e-6)
    engine.close()


def test_close_finishes_accepted_requests_and_refuses_new_ones(runner):
    gated = Gated(runner)
    engine = Engine(gated, EngineConfig(max_batch_size=2))
    futures = [engine.submit(_prepare(gated, w)) for w in WORDS[:7]]
    assert gated.started.wait(5)
    threading.Timer(0.2, lambda: (gated.gate.set(), gated.steps.release())).start()
    assert engine.close(timeout_s=30)
    assert all(f.result(0).output_tokens for f in futures)
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "late"))
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_close_past_its_grace_fails_what_is_left_as_unavailable(runner):
    gated = Gated(runner)
    engine = Engine(gated, EngineConfig(max_batch_size=1))
    futures = [engine.submit(_prepare(gated, w)) for w in WORDS[:3]]
    assert gated.started.wait(5)
    assert not engine.close(timeout_s=0.2)
    gated.gate.set()
    gated.steps.release()
    with pytest.raises(RequestError) as info:
        futures[-1].result(30)
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_an_answer_that_cannot_be_built_fails_its_request_alone(runner, monkeypatch):
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    broken = _prepare(runner, WORDS[0])
    build = runner.result

    def result(request, hyp, batch_size):
        if request is broken:
            raise ValueError("a bug")
        return build(request, hyp, batch_size)

    monkeypatch.setattr(runner, "result", result)
    futures = [engine.submit(r) for r in (broken, _prepare(runner, WORDS[1]), _prepare(runner, WORDS[2]))]
    with pytest.raises(RequestError) as info:
        futures[0].result(30)
    assert info.value.code is ErrorCode.INTERNAL and "a bug" not in info.value.message
    assert all(f.result(30).text for f in futures[1:])
    assert engine.submit(_prepare(runner, WORDS[3])).result(30).text  # the engine answers on
    engine.close()
