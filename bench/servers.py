"""The servers the bench measures, each started and stopped here, and the CPU their processes use.

`ray`: the real service (server.start: HAProxy direct ingress, one deployment holding every
model). `plain`: the plain grpc.aio server over the same engines in a process of its own. Every
process started is stopped by its id; nothing is stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from attnserve.service.local_ray import free_ports, haproxy_processes
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc

READY_TIMEOUT_S = 300
RAY_LOG_TAIL = 25  # lines of each Serve log shown when the service fails to start


@dataclass(frozen=True)
class Target:
    """A server to load: its gRPC address and the processes whose CPU it spends ([] if unknown)."""

    kind: str
    address: str
    processes: Callable[[], list[psutil.Process]] = list


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds (user + system) and role of each process, keyed by pid, at one moment."""

    by_pid: dict[int, tuple[str, float]]

    @classmethod
    def take(cls, processes: list[psutil.Process]) -> CpuSample:
        """Samples the processes still alive."""
        by_pid = {}
        for p in processes:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                by_pid[p.pid] = (role(p), t.user + t.system)
        return cls(by_pid)

    def since(self, before: CpuSample) -> dict[int, tuple[str, float]]:
        """(role, CPU seconds) spent by each process between `before` and this sample."""
        return {pid: (name, seconds - before.by_pid[pid][1])
                for pid, (name, seconds) in self.by_pid.items() if pid in before.by_pid}  # fmt: skip


@dataclass(frozen=True)
class CpuSpent:
    """CPU seconds of one window: the server's processes by role, this process's, and everything
    else's on this machine."""

    server: dict[str, float]
    client: float
    other: float


class CpuMeter:
    """Measures the CPU this process, a server's processes and the rest of the machine spend from
    its creation to `read()`."""

    def __init__(self, servers: list[psutil.Process]):
        self.me = psutil.Process()
        self.servers = [p for p in servers if p.pid != self.me.pid]
        self.before, self.busy = CpuSample.take([self.me, *self.servers]), busy_seconds()

    def read(self) -> CpuSpent:
        """CPU seconds spent since the meter was created."""
        busy = busy_seconds() - self.busy
        spent = CpuSample.take([self.me, *self.servers]).since(self.before)
        client = spent.pop(self.me.pid, ("", 0.0))[1]
        server = by_role(spent)
        return CpuSpent(server, client, busy - client - sum(server.values()))


def by_role(spent: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds summed by process role."""
    out: dict[str, float] = {}
    for name, seconds in spent.values():
        out[name] = out.get(name, 0.0) + seconds
    return out


def busy_seconds() -> float:
    """CPU seconds this machine has been busy (all CPUs, everything but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def role(process: psutil.Process) -> str:
    """What a server process is: replica, haproxy, proxy, controller, raylet, gcs or other."""
    try:
        text = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        return "other"
    for needle, name in (("ServeReplica", "replica"), ("haproxy", "haproxy"), ("ProxyActor", "proxy"),
                         ("ServeController", "controller"), ("raylet", "raylet"), ("gcs_server", "gcs"),
                         ("attnserve.bench.plain_server", "plain")):  # fmt: skip
        if needle in text:
            return name
    return "other"


def free_port() -> int:
    """A TCP port nobody listens on now, outside the range where Ray's processes bind theirs."""
    return free_ports()


def wait_until_serving(address: str, alive: Callable[[], bool] = lambda: True) -> None:
    """Polls ListModels until the server answers.

    Raises:
        RuntimeError: if `alive()` turns false or it does not answer within READY_TIMEOUT_S.
    """
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TranslatorStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"the server for {address} exited before it answered")
            with contextlib.suppress(grpc.RpcError):
                stub.ListModels(pb.ListModelsRequest(), timeout=2)
                return
            time.sleep(0.5)
    raise RuntimeError(f"no answer from {address} within {READY_TIMEOUT_S} s")


@contextlib.contextmanager
def plain_service(repository: Path, serve_config: Path, models: list[str] | None = None) -> Iterator[Target]:
    """Runs `python -m attnserve.bench.plain_server` for the models (all by default); stops it by pid on exit.

    Raises:
        RuntimeError: if it does not start serving (its output is printed).
    """
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "attnserve.bench.plain_server", "--repository", str(repository),
               "--address", address, "--serve-config", str(serve_config)]  # fmt: skip
    command += [arg for m in models or () for arg in ("--model", m)]
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_until_serving(address, lambda: child.poll() is None)
            except RuntimeError:
                log.seek(0)
                print(log.read()[-4000:], file=sys.stderr)
                raise
            process = psutil.Process(child.pid)
            yield Target("plain", address, lambda: [process, *_children(process)])
        finally:
            _terminate(child)


@contextlib.contextmanager
def ray_service(repository: Path, serve_config: Path, ready_address: str | None = None) -> Iterator[Target]:
    """Starts the real service (local Ray, every model) on free ports; stops it and what it left.

    ready_address: where to see it answer in plaintext, if not its gRPC port (which may be TLS).

    Raises:
        DeployError, RuntimeError: if it does not start (the tail of Serve's logs is printed).
    """
    from attnserve.service import ray_deploy as server
    from attnserve.service.config import LocalOptions

    had_haproxy_dir = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in os.environ
    options = LocalOptions(
        serve_config=serve_config, model_repository=repository, grpc_port=free_port(),
        http_port=free_port(), metrics_port=free_port(),
    )  # fmt: skip
    try:
        endpoints = server.start(options)
    except BaseException:
        _print_serve_logs()
        raise
    haproxy_dir = None if had_haproxy_dir else os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    try:
        wait_until_serving(ready_address or endpoints.grpc)
        yield Target("ray", endpoints.grpc, lambda: _ray_processes(haproxy_dir))
    finally:
        server.stop(endpoints)
        _remove_leftovers(haproxy_dir)
        if haproxy_dir:  # this run's HAProxy files (with --tls, a throwaway server key)
            shutil.rmtree(haproxy_dir, ignore_errors=True)
            for key in [k for k, v in os.environ.items() if v.startswith(haproxy_dir)]:
                del os.environ[key]  # a later service in this process makes its own folder


def _ray_processes(haproxy_dir: str | None) -> list[psutil.Process]:
    """Every descendant of this process (GCS, raylet, workers, HAProxy) and this run's HAProxy."""
    found = {p.pid: p for p in _children(psutil.Process())}
    for p in haproxy_processes(haproxy_dir):
        found.setdefault(p.pid, p)
    return list(found.values())


def _children(process: psutil.Process) -> list[psutil.Process]:
    """Descendants of a process ([] once it is gone)."""
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _remove_leftovers(haproxy_dir: str | None, grace_s: float = 5.0) -> None:
    """Stops, by pid, what the service left: this process's descendants and this run's HAProxy."""
    leftovers = [p for p in _ray_processes(haproxy_dir) if p.pid != os.getpid()]
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            print(f"stopping leftover process {p.pid} ({p.name()})", file=sys.stderr)
            p.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _terminate(child: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to a child, SIGKILL if it is still there after grace_s."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _print_serve_logs() -> None:
    """The tail of every Serve log of the Ray session this process started (if it got that far).

    Other Ray instances may run on this host: the session is the one holding this driver's log.
    """
    pattern = f"session_*/logs/python-core-driver-*_{os.getpid()}.log"
    drivers = (Path(tempfile.gettempdir()) / "ray").glob(pattern)
    sessions = sorted({p.parents[1] for p in drivers}, key=lambda p: p.stat().st_mtime)
    if not sessions:
        print("no Ray logs of this run found", file=sys.stderr)
        return
    print(f"Ray session of this run: {sessions[-1]}", file=sys.stderr)
    for path in sorted((sessions[-1] / "logs" / "serve").glob("*.log")):
        lines = path.read_text("utf-8", errors="replace").splitlines()[-RAY_LOG_TAIL:]
        print(f"--- {path} (last {len(lines)} lines)\n" + "\n".join(lines), file=sys.stderr)
