"""The environment of a local Ray that `attnserve serve` starts: the serving path's Ray Serve
settings, and ports and HAProxy files of its own."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import psutil

from attnserve.service import private_binds, worker_setup
from attnserve.service.tls import ServerTls

log = logging.getLogger("attnserve")
# Ray Serve settings of the serving path (FACTS.md: "The serving path, measured"): HAProxy
# forwards gRPC straight to the replica (direct ingress), the replica runs user code on its
# event loop, and its drain period is short because attnserve drains its engines first.
SERVE_ENVIRONMENT = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    # A call whose replica dies before answering is replayed on another server (inference is
    # idempotent), instead of failing with HAProxy's error page.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response",
    # One HAProxy thread forwards thousands of calls/s; Ray's default of 4 threads on a small
    # host competes with the replica (2 cores: c=1 p50 6.6 -> 4.2 ms, c=32 +10%; make bench).
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",
}


HAPROXY_DIR_PREFIX = "as-hap-"  # a run's HAProxy files: /tmp/as-hap-XXXXXXXX
LOCAL_RANGE = (20000, 26000)  # where a local service's Ray Serve ports are drawn (see free_ports)
PORT_BLOCK = 8  # direct-ingress ports of one host's replicas (one replica needs one of each)
# Ports Ray Serve would otherwise take at fixed defaults: the replicas' direct ingress (40000..,
# 30000..) and the fallback proxy (9500, 8500) are bound with SO_REUSEPORT, so a second Ray on
# the host silently shares them and HAProxy sends this service's calls to the other one; and
# HAProxy's stats (8404) and metrics (9101) ports.
LOCAL_PORTS = (
    ("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"),
    ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"),
    ("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", None),
    ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", None),
    ("RAY_SERVE_HAPROXY_STATS_PORT", None),
    ("RAY_SERVE_HAPROXY_METRICS_PORT", None),
)


def free_ports(size: int = 1, low: int = 26000, high: int = 29500) -> int:
    """The first of `size` consecutive free ports in [low, high), drawn at random.

    The range lies below Linux's ephemeral ports (32768+, where Ray's processes bind their own
    random ports, so a port chosen now is not taken by one of them before the service binds it)
    and above Ray's worker ports (10002-19999). The ports of a local service's Ray Serve come from
    20000-25999 (LOCAL_RANGE), those handed to a service (tests, bench) from 26000-29499, so
    neither takes the other's.
    """
    while True:
        base = random.randrange(low, high - size)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + size):
                    held.enter_context(socket.socket()).bind(("0.0.0.0", port))
            except OSError:
                continue
            return base


def set_local_environment() -> None:
    """Serving settings for the local Ray this process starts (the environment may override them).

    HAProxy's files go to a folder of this run, so leftover HAProxy processes can be found by it,
    and the ports Ray Serve would take at fixed defaults are free ones of this run, so two
    services on one host neither collide nor serve each other's calls. While no application is
    deployed (start-up, a redeploy) calls get UNAVAILABLE "attnserve is starting or redeploying;
    retry" instead of Ray's NOT_FOUND: HAProxy runs through `attnserve-haproxy` (tls_front.py,
    which also terminates TLS), and Serve's fallback proxy is changed by Ray's worker process
    setup hook (worker_setup.py).
    """
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in os.environ:  # the supervisor may have set it
        run = Path(tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX))  # short: socket paths end at 97 bytes
        os.environ.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(run / "haproxy.cfg"))
        os.environ.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", str(run / "admin.sock"))
        os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", str(run))
        os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(run / "server-state"))
    wrapper = _haproxy_wrapper()
    if wrapper:
        os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)
    else:
        log.warning("attnserve-haproxy is not installed: calls made while starting get Ray's NOT_FOUND")
    os.environ.setdefault(worker_setup.SETUP_HOOK_ENV, worker_setup.SETUP_HOOK)
    if ServerTls.from_env():
        _secure_environment(wrapper)
    for low, high in LOCAL_PORTS:
        if low not in os.environ:
            base = free_ports(PORT_BLOCK if high else 1, *LOCAL_RANGE)
            os.environ[low] = str(base)
            if high:
                os.environ[high] = str(base + PORT_BLOCK - 1)


def _haproxy_wrapper() -> str | None:
    """`attnserve-haproxy` beside this Python, else on PATH; None if it is not installed."""
    wrapper = Path(sys.executable).with_name("attnserve-haproxy")
    return str(wrapper) if wrapper.exists() else shutil.which("attnserve-haproxy")


def _secure_environment(wrapper: str | None) -> None:
    """With TLS: Ray's HAProxy must run through `attnserve-haproxy` (TLS on the gRPC port, its other
    listeners on loopback), and Serve's plaintext gRPC servers bind loopback (private_binds)."""
    if not wrapper:
        raise RuntimeError("attnserve-haproxy is not installed beside attnserve (pip install attnserve)")
    for key, value in private_binds.local_environment().items():
        os.environ.setdefault(key, value)


def haproxy_processes(haproxy_dir: str | None) -> list[psutil.Process]:
    """HAProxy processes whose command line names a run's HAProxy folder ([] without one)."""
    if not haproxy_dir:
        return []
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(haproxy_dir in part for part in p.info["cmdline"] or ()):
                found.append(p)
    return found
