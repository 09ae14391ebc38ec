"""Starts Ray (or joins a cluster), deploys the serve config file, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.serve._private import api as serve_api  # the path `serve run config.yaml` takes
from ray.serve._private.common import DeploymentStatus
from ray.serve.config import gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from attnserve.service.app import DEPLOYMENT
from attnserve.service.config import AppArgs, LocalOptions, load_serve_config

log = logging.getLogger("attnserve")
DEPLOY_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 30
DRAIN_GRACE_S = 5.0  # accepted calls get this long to finish after SIGTERM
LAME_DUCK_S = 1.0  # then the ports stay open this long, refusing calls cleanly while balancers look away
SUPERVISED = "ATTNSERVE_SUPERVISED"  # set in the serving child of `attnserve serve`
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


@dataclass(frozen=True)
class Endpoints:
    """Where the running service answers, and what it runs."""

    grpc: str
    metrics: str | None
    applications: tuple[str, ...]
    local: bool


class DeployError(RuntimeError):
    """An application did not reach RUNNING."""


def start(options: LocalOptions) -> Endpoints:
    """Starts (or joins) Ray, starts Serve with the file's proxies, deploys it; waits until running.

    Raises:
        ValueError: for an invalid config file.
        DeployError: if an application fails to deploy or is not running within 5 minutes.
    """
    config = load_serve_config(options)
    address = options.address or os.environ.get("RAY_ADDRESS")
    local = address is None
    init_args: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if local:
        _set_local_environment()
        init_args |= {"num_cpus": options.num_cpus, "_metrics_export_port": options.metrics_port}
    # "local": a new Ray even when `ray start` ran on this machine (without it, ray.init joins
    # the cluster in /tmp/ray/ray_current_cluster, or hangs when that cluster is gone).
    ray.init(address="local" if local else address, **init_args)
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(),
            grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
            proxy_location=config.proxy_location,
        )
        if local:
            _check_local_gpus(config)
            _answer_proxy_errors_as_unavailable()
        client.deploy_apps(config)
        _wait_until_running(config)
    except BaseException:
        stop(Endpoints("", None, tuple(a.name for a in config.applications), local))
        raise
    return Endpoints(
        grpc=f"127.0.0.1:{config.grpc_options.port}",
        metrics=f"http://127.0.0.1:{options.metrics_port}/metrics" if local else None,
        applications=tuple(a.name for a in config.applications),
        local=local,
    )


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


def _free_ports(size: int) -> int:
    """The first of `size` consecutive free ports, drawn at random below Linux's ephemeral range
    (32768+, where other processes' random ports land) and below Ray's default replica ports."""
    while True:
        base = random.randrange(20000, 29500)
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + size):
                    held.enter_context(socket.socket()).bind(("0.0.0.0", port))
            except OSError:
                continue
            return base


def _set_local_environment() -> None:
    """Serving settings for the local Ray this process starts (the environment may override them).

    HAProxy's files go to a folder of this run, so leftover HAProxy processes can be found by it,
    and the ports Ray Serve would take at fixed defaults are free ones of this run, so two
    services on one host neither collide nor serve each other's calls.
    """
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    run = Path(tempfile.mkdtemp(prefix="as-hap-"))  # short: HAProxy's socket paths end at 97 bytes
    os.environ.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(run / "haproxy.cfg"))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", str(run / "admin.sock"))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", str(run))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(run / "server-state"))
    for low, high in LOCAL_PORTS:
        if low not in os.environ:
            base = _free_ports(PORT_BLOCK if high else 1)
            os.environ[low] = str(base)
            if high:
                os.environ[high] = str(base + PORT_BLOCK - 1)


# What HAProxy answers when a replica dies mid-call and no retry can save the call: a gRPC
# trailers-only UNAVAILABLE (Ray's page is an HTTP 500, which gRPC clients read as UNKNOWN).
UNAVAILABLE_PAGE = (
    "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 14\r\n"
    "grpc-message: the serving replica is restarting; retry\r\ncontent-length: 0\r\n\r\n"
)


def _answer_proxy_errors_as_unavailable(timeout_s: float = 20.0) -> None:
    """Replaces Ray's HAProxy error page before the first replica joins (HAProxy reads it then)."""
    config_dir = Path(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "")).parent
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or config_dir == Path("."):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pages = list(config_dir.glob("*/500.http"))
        if pages:
            for page in pages:
                page.write_text(UNAVAILABLE_PAGE)
            return
        time.sleep(0.1)
    log.warning(
        "HAProxy's error page did not appear in %s; a killed replica's calls may get UNKNOWN", config_dir
    )


def _check_local_gpus(config: ServeDeploySchema) -> None:
    """A local Ray cannot grow: fail now if the config asks for GPUs it does not have."""
    have = ray.cluster_resources().get("GPU", 0)
    for app in config.applications:
        want = AppArgs.model_validate(app.args).replica.num_gpus
        if want > have:
            raise DeployError(
                f"application {app.name!r} asks for {want:g} GPU per model replica, but this host's Ray "
                f"has {have:g} GPUs; use the CPU profile (deploy/serve/attnserve.yaml) or a GPU host"
            )


def _wait_until_running(config: ServeDeploySchema) -> None:
    """Polls Serve's status until every application runs; raises with Serve's message if one fails."""
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    names = [a.name for a in config.applications]
    while time.monotonic() < deadline:
        apps = serve.status().applications
        statuses = {n: apps[n].status for n in names if n in apps}
        failed = [n for n, s in statuses.items() if s == ApplicationStatus.DEPLOY_FAILED]
        if failed:
            app = apps[failed[0]]
            reasons = [
                _last_line(d.message)
                for d in app.deployments.values()
                if d.status == DeploymentStatus.DEPLOY_FAILED
            ]
            raise DeployError(
                f"application {failed[0]!r} failed to deploy: {'; '.join(reasons) or app.message}"
            )
        if len(statuses) == len(names) and all(s == ApplicationStatus.RUNNING for s in statuses.values()):
            return
        time.sleep(1)
    raise DeployError(f"applications {names} not running after {DEPLOY_TIMEOUT_S} s")


def _last_line(message: str) -> str:
    """The exception line at the end of a replica's error text (its traceback is in Ray's logs)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


def stop(endpoints: Endpoints, drain: bool = False) -> None:
    """Removes the applications; a local Ray is shut down entirely, a cluster is left running.

    With drain, every application first turns NOT_SERVING and lets its accepted calls finish
    (up to DRAIN_GRACE_S); calls arriving meanwhile are refused with UNAVAILABLE, and the ports
    stay open LAME_DUCK_S longer, so a call sent while the service drains is refused by it
    rather than cut off when the ports close. Serve's own shutdown gets SHUTDOWN_TIMEOUT_S: when
    the raylet is already gone, Serve would wait forever.
    """
    # One event loop for the drain handles and Serve's shutdown: with
    # RAY_SERVE_THROUGHPUT_OPTIMIZED a handle's router runs on the caller's loop.
    asyncio.run(_stop(endpoints, drain))
    ray.shutdown()


async def _stop(endpoints: Endpoints, drain: bool) -> None:
    """Drains (optionally), then removes the applications or shuts Serve down."""
    if drain:
        started = time.monotonic()
        for name, outcome in zip(endpoints.applications, await _drain(endpoints.applications), strict=True):
            if isinstance(outcome, BaseException):  # a replica already gone has nothing left to drain
                print(f"draining {name} failed: {type(outcome).__name__}: {outcome}", file=sys.stderr)
            elif not outcome:
                print(f"{name}: calls still running after {DRAIN_GRACE_S:g} s", file=sys.stderr)
        print(f"drained in {time.monotonic() - started:.1f} s", flush=True)
        await asyncio.sleep(LAME_DUCK_S)
    try:
        if endpoints.local:
            await asyncio.wait_for(serve.shutdown_async(), SHUTDOWN_TIMEOUT_S)
        else:
            for name in endpoints.applications:
                await asyncio.wait_for(asyncio.to_thread(serve.delete, name), SHUTDOWN_TIMEOUT_S)
    except TimeoutError:
        log.warning("Serve did not shut down within %d s; stopping Ray anyway", SHUTDOWN_TIMEOUT_S)


async def _drain(applications: tuple[str, ...]) -> list:
    """Asks each application's replica to drain; its result, or the exception, per application."""

    async def one(name: str):
        handle = serve.get_deployment_handle(DEPLOYMENT, app_name=name)
        return await asyncio.wait_for(handle.drain.remote(DRAIN_GRACE_S), DRAIN_GRACE_S + 5)

    return await asyncio.gather(*(one(n) for n in applications), return_exceptions=True)


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
        _set_local_environment()  # inherited by the child, so the supervisor knows HAProxy's folder
    child = subprocess.Popen(
        [sys.executable, "-m", "attnserve.service.cli", *sys.argv[1:]],
        env={**os.environ, SUPERVISED: "1"},
        start_new_session=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: _forward(child))
    signal.signal(signal.SIGINT, lambda *_: _forward(child))
    code = child.wait()
    _remove_leftovers(child.pid, os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE"))
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
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            cmdline = p.info["cmdline"] or []
            ours = bool(haproxy_dir) and any(haproxy_dir in part for part in cmdline)
            if p.pid != os.getpid() and (ours or os.getsid(p.pid) == session):
                log.warning("stopping leftover process %d (%s)", p.pid, " ".join(cmdline[:2]))
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
        if endpoints.metrics:
            print(f"Prometheus metrics: {endpoints.metrics}", flush=True)
        print("Stop with Ctrl-C.", flush=True)
        stop_requested.wait()
        print("stopping attnserve: draining ...", flush=True)
    finally:
        stop(endpoints, drain=stop_requested.is_set())
