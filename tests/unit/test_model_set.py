"""Versions loaded, routed and swapped while calls run, on real engines (no Ray)."""

from __future__ import annotations

import threading
import time

import pytest

from attnserve.bench.version_memory import copy_as_version
from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.requests import AttentionMode
from attnserve.core.scheduler import EngineConfig
from attnserve.core.versions import VersionPolicy, scan, wanted
from attnserve.service.model_set import ModelSet
from tests.conftest import BUNDLED_ENTRY

MODEL = "g2p-bahdanau"
SETTINGS = EngineConfig(max_batch_size=8)


def _add_version(repository, version: int) -> None:
    copy_as_version(BUNDLED_ENTRY, repository, version)


@pytest.fixture
def repository(tmp_path):
    _add_version(tmp_path, 1)
    return tmp_path


def _apply(models: ModelSet, repository, policy=VersionPolicy()):
    return models.reconcile(wanted(scan(repository), policy), lambda name: SETTINGS)


def _prepare(engine):
    return engine.runner.codec.prepare("versions", AttentionMode.NONE)


def _call(models: ModelSet, version: str = ""):
    engine, future = models.submit(MODEL, version, _prepare, None)
    return engine.runner.manifest.version, future.result(30)


def test_a_new_version_is_served_beside_the_old_and_takes_the_default_calls(repository):
    models = ModelSet()
    try:
        assert _apply(models, repository).added == ((MODEL, 1),)
        _add_version(repository, 2)
        change = _apply(models, repository, VersionPolicy(latest=2))
        assert change.added == ((MODEL, 2),) and not change.removed
        assert models.loaded() == {MODEL: (1, 2)}
        assert _call(models)[0] == "2" and _call(models, "1")[0] == "1"
        assert _call(models, "1")[1].output_tokens == _call(models, "2")[1].output_tokens  # same weights
        assert [(m.version, state) for m, state, _ in models.states()] == [("1", "READY"), ("2", "READY")]
        assert models.default_share(MODEL, 2) == 1.0 and models.default_share(MODEL, 1) == 0.0
    finally:
        models.close()


def test_a_removed_version_is_not_found_and_its_memory_freed(repository):
    models = ModelSet(drain_s=5)
    try:
        _add_version(repository, 2)
        _apply(models, repository, VersionPolicy(all=True))
        old = models.route(MODEL, "1")
        assert _apply(models, repository, VersionPolicy(versions=(2,))).removed == ((MODEL, 1),)
        with pytest.raises(RequestError) as info:
            _call(models, "1")
        assert info.value.code is ErrorCode.NOT_FOUND and "loaded versions: 2" in info.value.message
        for _ in range(500):
            if not any(state == "UNLOADING" for _, state, _ in models.states()):
                break
            time.sleep(0.01)
        assert [m.version for m, _, _ in models.states()] == ["2"]
        with pytest.raises(RequestError):  # its engine is closed
            old.submit(_prepare(old))
    finally:
        models.close()


def test_swapping_versions_under_load_fails_no_call(repository):
    models = ModelSet(drain_s=10)
    _apply(models, repository)
    results: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            try:
                results.append(_call(models)[0])
            except Exception as e:  # any failure fails the test
                errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        _add_version(repository, 2)
        _apply(models, repository)  # latest 1: version 2 replaces version 1
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        models.close()
    assert not errors, errors[:3]
    assert "1" in results and "2" in results and results[-1] == "2"


def test_a_broken_version_is_left_out_and_the_others_still_change(repository):
    models = ModelSet()
    try:
        _apply(models, repository)
        _add_version(repository, 2)
        (repository / MODEL / "2" / "decoder_step.onnx").write_bytes(b"not a graph")
        change = _apply(models, repository, VersionPolicy(latest=2))
        assert change.added == () and change.failed[0][0] == (MODEL, 2)
        assert "sha256" in change.failed[0][1]
        assert models.loaded() == {MODEL: (1,)}
    finally:
        models.close()
