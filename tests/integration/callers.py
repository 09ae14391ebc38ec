"""Closed-loop Translate callers for the tests that change a running service under load."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from attnserve.service.client import Client
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc

Call = tuple[float, float, str, str]  # start, end (time.time()), code, answering version or details


@dataclass
class Callers:
    """`sdk` callers through the Client (its retries) and `raw` plain grpcio callers (none)."""

    address: str
    model: str
    sdk: int = 0
    raw: int = 0
    text: str = "load"
    calls: dict[str, list[Call]] = field(default_factory=lambda: {"sdk": [], "raw": []})
    stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self, kind: str, call) -> None:
        while not self.stop.is_set():
            started = time.time()
            try:
                outcome = ("OK", call().model_version)
            except grpc.RpcError as e:
                outcome = (e.code().name, e.details() or "")
            self.calls[kind].append((started, time.time(), *outcome))

    def _sdk(self) -> None:
        with Client(self.address, timeout_s=30) as client:
            self._loop("sdk", lambda: client.translate(self.model, self.text))

    def _raw(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.TranslatorStub(channel)
            request = pb.TranslateRequest(model=self.model, text=self.text)
            self._loop("raw", lambda: stub.Translate(request, timeout=10))

    @contextlib.contextmanager
    def running(self):
        """Runs the callers for the body of a with statement."""
        threads = [threading.Thread(target=self._sdk, daemon=True) for _ in range(self.sdk)]
        threads += [threading.Thread(target=self._raw, daemon=True) for _ in range(self.raw)]
        for t in threads:
            t.start()
        try:
            yield self
        finally:
            self.stop.set()
            for t in threads:
                t.join(40)

    def codes(self, kind: str) -> Counter:
        """Calls of a kind by status code."""
        return Counter(code for *_, code, _ in self.calls[kind])

    def versions(self, kind: str) -> Counter:
        """OK calls of a kind by the version that answered."""
        return Counter(detail for *_, code, detail in self.calls[kind] if code == "OK")

    def failures(self, kind: str) -> list[Call]:
        """The calls of a kind that did not get OK."""
        return [c for c in self.calls[kind] if c[2] != "OK"]

    def ok_per_s(self, start: float, end: float) -> float:
        """Calls of both kinds answered OK per second that ended in [start, end)."""
        done = sum(
            1 for calls in self.calls.values() for _, e, code, _ in calls if start <= e < end and code == "OK"
        )
        return round(done / max(end - start, 1e-9), 1)
