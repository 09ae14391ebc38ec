"""The setup hook every worker of a local Ray runs: Serve's fallback proxy answers UNAVAILABLE in
plain words for an application it does not know, patched only once Serve imports its proxy."""

from __future__ import annotations

import asyncio
import sys
import types

import grpc
import pytest

from attnserve.service import worker_setup
from attnserve.service.tls_front import STARTING_MESSAGE


def _not_found_answers(proxy_class, app_name: str) -> list:
    async def collect():
        request = types.SimpleNamespace(app_name=app_name)
        return [a async for a in proxy_class.not_found_response(None, request)]

    return asyncio.run(collect())


def test_the_proxy_answers_an_unknown_application_with_unavailable_in_plain_words():
    from ray.serve._private import proxy

    # A subclass stands in for Ray's class, which the patch would otherwise change for the session.
    copy = types.SimpleNamespace(
        gRPCProxy=type("gRPCProxy", (proxy.gRPCProxy,), {}), ResponseStatus=proxy.ResponseStatus
    )
    (before,) = _not_found_answers(copy.gRPCProxy, "")
    assert before.code == grpc.StatusCode.NOT_FOUND and "Application metadata not set" in before.message
    worker_setup.answer_unknown_application_as_starting(copy)
    for app_name in ("", "attnserve"):
        (status,) = _not_found_answers(copy.gRPCProxy, app_name)
        assert status.code == grpc.StatusCode.UNAVAILABLE and status.message == STARTING_MESSAGE
        assert status.is_error
    (untouched,) = _not_found_answers(proxy.gRPCProxy, "")
    assert untouched.code == grpc.StatusCode.NOT_FOUND


def test_a_patch_waits_for_its_module_to_be_imported(tmp_path, monkeypatch):
    (tmp_path / "as_late_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    seen = []
    worker_setup.when_imported("as_late_module", lambda module: seen.append(module.VALUE))
    assert seen == []
    try:
        import as_late_module  # noqa: F401

        assert seen == [1]
        worker_setup.when_imported("as_late_module", lambda module: seen.append(2))  # already there: now
        assert seen == [1, 2]
    finally:
        sys.modules.pop("as_late_module", None)


def test_a_failing_patch_leaves_the_module_importable(tmp_path, monkeypatch):
    (tmp_path / "as_other_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))

    def broken(module):
        raise AttributeError("Ray renamed it")

    worker_setup.when_imported("as_other_module", broken)
    try:
        import as_other_module

        assert as_other_module.VALUE == 1
    finally:
        sys.modules.pop("as_other_module", None)


@pytest.mark.parametrize("haproxy", ["1", "0"])
def test_the_hook_changes_the_proxy_only_in_haproxy_mode(monkeypatch, haproxy):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", haproxy)
    monkeypatch.delenv("ATTNSERVE_PRIVATE_HOST", raising=False)
    patched = []
    monkeypatch.setattr(worker_setup, "when_imported", lambda name, then: patched.append(name))
    worker_setup.apply()
    assert patched == ([worker_setup.PROXY_MODULE] if haproxy == "1" else [])
