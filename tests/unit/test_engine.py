"""The engine without Ray: batched == alone, queue bounds, deadlines, cancellation, drain."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import CancelledError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.models.g2p_data import load_split
from attnserve.service.core.engine import BatchCost, Engine, EngineConfig
from attnserve.service.core.errors import ErrorCode, RequestError
from attnserve.service.core.translation import AttentionMode, Translator

WORDS = [e.word for e in load_split("test")[:400]]


@pytest.fixture(scope="module")
def translator(bundled_manifest):
    return Translator(bundled_manifest)


class Gated:
    """The real Translator behind a gate the test opens; records every batch it decodes."""

    def __init__(self, translator: Translator):
        self.inner = translator
        self.manifest, self.codec, self.model = translator.manifest, translator.codec, translator.model
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[list] = []

    def translate_batch(self, requests):
        self.started.set()
        self.gate.wait(10)
        self.batches.append(list(requests))
        return self.inner.translate_batch(requests)


class Recorder:
    """An observer that keeps what the engine reported."""

    def __init__(self):
        self.rejections, self.drops, self.sizes = [], [], []

    def rejected(self, reason):
        self.rejections.append(reason)

    def dropped(self, reason):
        self.drops.append(reason)

    def batch(self, waits, decode_s, output_tokens):
        self.sizes.append(len(waits))

    def queue_depth(self, queued):
        pass


def _prepare(translator, word, attention=AttentionMode.CROSS, beam_size=1):
    return translator.codec.prepare(word, attention, beam_size=beam_size)


def _busy(translator, config: EngineConfig):
    """An engine whose first batch is held at the gate: (gated, recorder, engine, that batch's future)."""
    gated, recorder = Gated(translator), Recorder()
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
def test_batched_answers_equal_decoding_alone(translator, picks, beams, max_batch, seed):
    engine = Engine(translator, EngineConfig(max_batch_size=max_batch))
    rng = random.Random(seed)
    requests = [_prepare(translator, WORDS[i], beam_size=b) for i, b in zip(picks, beams, strict=False)]
    futures = []
    try:
        for r in requests:  # random arrival times, so batches form differently each example
            futures.append(engine.submit(r))
            time.sleep(rng.choice([0, 0, 0.0005, 0.002]))
        got = [f.result(30) for f in futures]
    finally:
        engine.close()
    for request, result in zip(requests, got, strict=True):
        (alone,) = translator.translate_batch([request])
        assert result.output_tokens == alone.output_tokens
        assert result.attention.shape == alone.attention.shape
        assert abs(result.attention - alone.attention).max() < 1e-4


def test_batches_take_what_is_queued_when_the_engine_is_free(translator):
    gated, recorder = Gated(translator), Recorder()
    engine = Engine(gated, EngineConfig(max_batch_size=8), recorder)
    first = engine.submit(_prepare(gated, "first"))
    assert gated.started.wait(5)
    rest = [engine.submit(_prepare(gated, w)) for w in WORDS[:20]]
    gated.gate.set()
    for f in [first, *rest]:
        f.result(30)
    engine.close()
    assert recorder.sizes == [1, 8, 8, 4]  # no wait timer: the queue filled while a batch ran


def test_queue_is_bounded_by_count(translator):
    gated, recorder, engine, running = _busy(translator, EngineConfig(max_batch_size=4, max_queued=3))
    queued = [engine.submit(_prepare(gated, w)) for w in ("one", "two", "three")]
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "four"))
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "3 requests queued" in info.value.message
    assert recorder.rejections == ["queue_full"]
    gated.gate.set()
    assert all(f.result(30).output_tokens for f in [running, *queued])
    engine.close()


def test_queue_is_bounded_by_expected_wait(translator):
    gated, recorder, engine, running = _busy(translator, EngineConfig(max_batch_size=2, max_queue_wait_s=0.5))
    engine.cost.observe(2, 0.4)  # as if measured: a batch of 2 takes 0.4 s
    accepted = [engine.submit(_prepare(gated, "a"))]  # ~0.2 s for the running batch + 0.2 s its own
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "b"))  # ~0.2 s + its own batch of 2, 0.4 s: over 0.5 s
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED and "expected wait" in info.value.message
    assert recorder.rejections == ["queue_wait"]
    gated.gate.set()
    for f in [running, *accepted]:
        f.result(30)
    engine.close()


def test_a_deadline_that_passes_in_the_queue_drops_the_request_undecoded(translator):
    gated, recorder, engine, running = _busy(translator, EngineConfig(max_batch_size=8))
    late = _prepare(gated, "late")
    doomed = engine.submit(late, deadline=time.monotonic() + 0.05)
    fine = engine.submit(_prepare(gated, "fine"))
    time.sleep(0.1)
    gated.gate.set()
    with pytest.raises(RequestError) as info:
        doomed.result(30)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    assert fine.result(30).output_tokens and running.result(30).output_tokens
    engine.close()
    assert all(late is not r for batch in gated.batches for r in batch)
    assert recorder.drops == ["deadline"]


def test_a_deadline_that_cannot_be_met_is_refused_at_once(translator):
    gated, _, engine, busy = _busy(translator, EngineConfig(max_batch_size=1, max_queue_wait_s=10))
    engine.cost.observe(1, 5.0)  # as if measured: the running batch takes 5 s
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(translator, "soon"), deadline=time.monotonic() + 1.0)
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    gated.gate.set()
    busy.result(30)
    engine.close()


def test_a_cancelled_request_is_not_decoded(translator):
    gated, recorder, engine, running = _busy(translator, EngineConfig(max_batch_size=8))
    request = _prepare(gated, "cancelled")
    cancelled = engine.submit(request)
    kept = engine.submit(_prepare(gated, "kept"))
    assert cancelled.cancel()
    gated.gate.set()
    assert kept.result(30).output_tokens and running.result(30).output_tokens
    with pytest.raises(CancelledError):
        cancelled.result(0)
    engine.close()
    assert all(request is not r for batch in gated.batches for r in batch)
    assert recorder.drops == ["cancelled"]


def test_close_finishes_accepted_requests_and_refuses_new_ones(translator):
    gated = Gated(translator)
    engine = Engine(gated, EngineConfig(max_batch_size=2))
    futures = [engine.submit(_prepare(gated, w)) for w in WORDS[:7]]
    assert gated.started.wait(5)
    threading.Timer(0.2, gated.gate.set).start()
    assert engine.close(timeout_s=30)
    assert all(f.result(0).output_tokens for f in futures)
    with pytest.raises(RequestError) as info:
        engine.submit(_prepare(gated, "late"))
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_close_past_its_grace_fails_what_is_left_as_unavailable(translator):
    gated = Gated(translator)
    engine = Engine(gated, EngineConfig(max_batch_size=1))
    futures = [engine.submit(_prepare(gated, w)) for w in WORDS[:3]]
    assert gated.started.wait(5)
    assert not engine.close(timeout_s=0.2)
    gated.gate.set()
    with pytest.raises(RequestError) as info:
        futures[-1].result(30)
    assert info.value.code is ErrorCode.UNAVAILABLE


def test_batch_cost_fits_intercept_and_slope():
    cost = BatchCost(smoothing=0.5)
    assert cost.seconds(8) is None
    cost.observe(4, 0.04)
    assert cost.seconds(8) == pytest.approx(0.08)  # one size seen: proportional
    for size in [1, 8, 16, 32, 2, 24] * 5:
        cost.observe(size, 0.01 + 0.002 * size)
    assert cost.seconds(32) == pytest.approx(0.074, rel=0.05)
    assert cost.seconds(1) == pytest.approx(0.012, rel=0.2)
