"""Starts Ray (or joins a cluster), deploys the serve config file, and stops cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve._private import api as serve_api  # the path `serve run config.yaml` takes
from ray.serve._private.common import DeploymentStatus
from ray.serve.config import gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from attnserve.service.config import AppArgs, LocalOptions, load_serve_config

log = logging.getLogger("attnserve")
DEPLOY_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 30


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


def _check_local_gpus(config: ServeDeploySchema) -> None:
    """A local Ray cannot grow: fail now if the config asks for GPUs it does not have."""
    have = ray.cluster_resources().get("GPU", 0)
    for app in config.applications:
        want = AppArgs.model_validate(app.args).model_defaults.num_gpus
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


def serve_until_signalled(options: LocalOptions) -> None:
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
        print("stopping attnserve ...", flush=True)
    finally:
        stop(endpoints)
