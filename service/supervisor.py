"""`attnserve serve`: a supervisor that runs the service in a session of its own and stops it
gracefully on SIGTERM or SIGINT, to the process or to its whole group."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from attnserve.service.config import LocalOptions
from attnserve.service.local_ray import HAPROXY_DIR_PREFIX, haproxy_processes, set_local_environment
from attnserve.service.ray_deploy import start, stop

log = logging.getLogger("attnserve")
SUPERVISED = "ATTNSERVE_SUPERVISED"  # set in the serving child of `attnserve serve`


def serve_until_signalled(options: LocalOptions) -> int:
    """Runs the service until SIGINT or SIGTERM; returns the exit status.

    The serving process (this driver, Ray and HAProxy) runs as a child in a session of its own,
    so a SIGTERM to this process's group reaches only this supervisor, which forwards one
    SIGTERM: the child drains (health NOT_SERVING, accepted calls finish) and stops Ray, and the
    supervisor then removes anything of the child's that is left.
    """
    if os.environ.get(SUPERVISED) == "1":
        _exit_with_parent()
        _serve_child(options)
        return 0
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        set_local_environment()  # inherited by the child, so the supervisor knows HAProxy's folder
    child = subprocess.Popen(
        [sys.executable, "-m", "attnserve.cli.main", *sys.argv[1:]],
        env={**os.environ, SUPERVISED: "1"},
        start_new_session=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: _forward(child))
    signal.signal(signal.SIGINT, lambda *_: _forward(child))
    code = child.wait()
    haproxy_dir = os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    _remove_leftovers(child.pid, haproxy_dir)
    if haproxy_dir and Path(haproxy_dir).name.startswith(HAPROXY_DIR_PREFIX):  # this run's, not a user's
        shutil.rmtree(haproxy_dir, ignore_errors=True)
    return code


def _forward(child: subprocess.Popen) -> None:
    """Passes one stop request to the serving child."""
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)


def _exit_with_parent() -> None:
    """Asks Linux to send this process SIGTERM if the supervisor dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _remove_leftovers(session: int, haproxy_dir: str | None) -> None:
    """Kills what the serving child left: its session's processes and this run's HAProxy
    (a reload's successor can outlive Ray, holding the ports)."""
    leftovers = {p.pid: p for p in haproxy_processes(haproxy_dir)}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == session:
                leftovers[p.pid] = p
    leftovers.pop(os.getpid(), None)
    for p in leftovers.values():
        with contextlib.suppress(psutil.Error):
            log.warning("stopping leftover process %d (%s)", p.pid, p.name())
            p.kill()


def _serve_child(options: LocalOptions) -> None:
    """Runs the service until SIGINT or SIGTERM, printing the addresses once it answers."""
    stop_requested = threading.Event()
    endpoints = start(options)
    try:
        # After start(): ray.init installs its own handlers, which would kill the driver abruptly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_requested.set())
        print(f"attnserve is up: gRPC {endpoints.grpc} (attnserve.v1.Translator)", flush=True)
        if endpoints.ingresses:
            where = [f"{address} (node {node}{', head' if i == 0 else ''})"
                     for i, (node, address) in enumerate(endpoints.ingresses)]  # fmt: skip
            print(f"gRPC ingress on every node: {', '.join(where)}", flush=True)
        if endpoints.metrics:
            print(f"Prometheus metrics: {endpoints.metrics}", flush=True)
        print("Stop with Ctrl-C.", flush=True)
        stop_requested.wait()
        print("stopping attnserve: draining ...", flush=True)
    finally:
        stop(endpoints, drain=stop_requested.is_set())
