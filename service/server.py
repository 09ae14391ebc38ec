"""Starts Ray (or joins a cluster), deploys the serve config file, and stops cleanly."""

from __future__ import annotations

import contextlib
import logging
import os
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_local_environment() -> None:
    """Serving settings for the local Ray this process starts (the environment may override them).

    HAProxy's files go to a folder of this run, so leftover HAProxy processes can be found by it,
    and its stats and metrics ports are free ones, so two services on one host do not collide.
    """
    for key, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    run = Path(tempfile.mkdtemp(prefix="as-hap-"))  # short: HAProxy's socket paths end at 97 bytes
    os.environ.setdefault("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", str(run / "haproxy.cfg"))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SOCKET_PATH", str(run / "admin.sock"))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", str(run))
    os.environ.setdefault("RAY_SERVE_HAPROXY_SERVER_STATE_FILE", str(run / "server-state"))
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))


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


def drain(endpoints: Endpoints, grace_s: float = DRAIN_GRACE_S) -> None:
    """Turns every application NOT_SERVING and lets its accepted calls finish (up to grace_s)."""
    calls = []
    for name in endpoints.applications:
        with contextlib.suppress(Exception):
            calls.append(serve.get_deployment_handle(DEPLOYMENT, app_name=name).drain.remote(grace_s))
    for call in calls:
        try:
            if not call.result(timeout_s=grace_s + 5):
                log.warning("calls still running after %.0f s of draining", grace_s)
        except Exception as e:  # a replica already gone has nothing left to drain
            log.warning("draining failed: %s", type(e).__name__)


def stop(endpoints: Endpoints) -> None:
    """Removes the applications; a local Ray is shut down entirely, a cluster is left running.

    Serve's graceful shutdown gets SHUTDOWN_TIMEOUT_S: when a supervisor has signalled the whole
    process group (systemd's default), the raylet is already gone and Serve would wait forever.
    """

    def remove() -> None:
        if endpoints.local:
            serve.shutdown()
        else:
            for name in endpoints.applications:
                serve.delete(name)

    worker = threading.Thread(target=remove, name="serve-shutdown", daemon=True)
    worker.start()
    worker.join(SHUTDOWN_TIMEOUT_S)
    if worker.is_alive():
        log.warning("Serve did not shut down within %d s; stopping Ray anyway", SHUTDOWN_TIMEOUT_S)
    ray.shutdown()


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
        drain(endpoints)
    finally:
        stop(endpoints)
