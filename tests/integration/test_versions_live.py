"""Versions on the real service: a version added to a polled repository takes the default calls
while 8 raw callers (no retries) run, the one it replaces leaves, and no call fails."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections import Counter

import grpc
import pytest

from attnserve.bench.version_memory import copy_as_version
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import BUNDLED_ENTRY
from tests.integration.conftest import SERVE_CONFIG, start_service

pytestmark = pytest.mark.integration
MODEL = "g2p-bahdanau"
POLL_S = 1.0
CALLERS = 8


@pytest.fixture(scope="module")
def polled(tmp_path_factory):
    """The service on a repository of one model version, polled every second."""
    repository = tmp_path_factory.mktemp("polled-repository")
    copy_as_version(BUNDLED_ENTRY, repository, 1)
    running = start_service(SERVE_CONFIG, "--repository", str(repository), "--poll-repository", str(POLL_S))
    yield running, repository
    running.process.send_signal(signal.SIGTERM)
    running.process.wait(120)


def _versions(stub) -> dict[str, str]:
    """version -> state of the model's ListModels entries."""
    return {
        m.version: m.state
        for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        if m.name == MODEL
    }


def test_a_polled_version_swaps_in_under_load_with_no_failed_call(polled):
    running, repository = polled
    channel = grpc.insecure_channel(running.grpc_address)  # raw grpcio: no retry policy
    stub = pb_grpc.TranslatorStub(channel)
    grpc.channel_ready_future(channel).result(timeout=10)
    alone = []  # the first call after the service said it is up, then warm calls one at a time
    for word in ["first", *["warm"] * 20]:
        started = time.perf_counter()
        stub.Translate(pb.TranslateRequest(model=MODEL, text=word), timeout=10)
        alone.append(1000 * (time.perf_counter() - started))
    first_ms, warm_ms = alone[0], statistics.median(alone[1:])
    with grpc.insecure_channel(running.grpc_address) as again:  # a new client of a warm server
        grpc.channel_ready_future(again).result(timeout=10)
        started = time.perf_counter()
        pb_grpc.TranslatorStub(again).Translate(pb.TranslateRequest(model=MODEL, text="first"), timeout=10)
        fresh_ms = 1000 * (time.perf_counter() - started)
    outcomes: list[tuple[str, str, float]] = []  # code, answering version, seconds
    stop = threading.Event()

    def caller(n: int) -> None:
        words = ["knight", "psychology", "queue", "rhythm"]
        i = 0
        while not stop.is_set():
            started = time.perf_counter()
            try:
                r = stub.Translate(pb.TranslateRequest(model=MODEL, text=words[(n + i) % 4]), timeout=10)
                outcomes.append(("OK", r.model_version, time.perf_counter() - started))
            except grpc.RpcError as e:
                outcomes.append((e.code().name, e.details(), time.perf_counter() - started))
            i += 1

    threads = [threading.Thread(target=caller, args=(n,), daemon=True) for n in range(CALLERS)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        assert _versions(stub) == {"1": "READY"}
        added = time.monotonic()
        copy_as_version(BUNDLED_ENTRY, repository, 2)
        while _versions(stub).get("2") != "READY":
            assert time.monotonic() - added < 30, _versions(stub)
            time.sleep(0.05)
        listed_s = time.monotonic() - added
        while "1" in _versions(stub):  # latest 1: version 1 finishes its calls and leaves
            assert time.monotonic() - added < 60
            time.sleep(0.05)
        gone_s = time.monotonic() - added
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    with pytest.raises(grpc.RpcError) as info:
        stub.Translate(pb.TranslateRequest(model=MODEL, text="old", version="1"), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND and "loaded versions: 2" in info.value.details()
    codes = Counter(code for code, _, _ in outcomes)
    answered = Counter(version for code, version, _ in outcomes if code == "OK")
    warm_p50 = 1000 * statistics.median(s for code, _, s in outcomes if code == "OK")
    print(
        f"\n{len(outcomes)} calls {dict(codes)} by version {dict(answered)}; version 2 listed READY "
        f"{listed_s:.2f} s after it was written (poll {POLL_S:g} s), version 1 gone after {gone_s:.2f} s; "
        f"first call {first_ms:.1f} ms (a new channel's first call once warm: {fresh_ms:.1f} ms) against a "
        f"warm p50 of {warm_ms:.1f} ms alone, "
        f"{warm_p50:.1f} ms under load"
    )
    assert codes == Counter({"OK": len(outcomes)}), codes
    assert answered["1"] and answered["2"]
    channel.close()
