"""Starts Ray (or joins a cluster), deploys the serve config file, and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray._common.constants import HEAD_NODE_RESOURCE_NAME  # in the resources of the head node only
from ray.serve._private import api as serve_api  # the path `serve run config.yaml` takes
from ray.serve._private.common import DeploymentStatus
from ray.serve.config import ProxyLocation, gRPCOptions
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from attnserve.service.app import DEPLOYMENT
from attnserve.service.auth import TOKENS_ENV
from attnserve.service.config import AppArgs, LocalOptions, load_serve_config
from attnserve.service.local_ray import set_local_environment
from attnserve.service.tls import HOST_ENV, ServerTls

log = logging.getLogger("attnserve")
DEPLOY_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 30
DRAIN_GRACE_S = 5.0  # accepted calls get this long to finish after SIGTERM
LAME_DUCK_S = 1.0  # then the ports stay open this long, refusing calls cleanly while balancers look away
WORKER_GRPC_PORT_ENV = "RAY_SERVE_WORKER_PROXY_GRPC_PORT"  # a worker node's own ingress port (Ray 2.60)


@dataclass(frozen=True)
class Endpoints:
    """Where the running service answers, and what it runs."""

    grpc: str
    metrics: str | None
    applications: tuple[str, ...]
    local: bool
    # On a cluster, each node's gRPC ingress, the head's first: (the node's IP, where it listens).
    ingresses: tuple[tuple[str, str], ...] = ()


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
        set_local_environment()
        init_args |= {"num_cpus": options.num_cpus, "_metrics_export_port": options.metrics_port}
        config = _secured(config)
    else:
        config = on_every_node(config)
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
        ingresses = () if local else node_ingresses(config.http_options.host, config.grpc_options.port)
        if not ServerTls.from_env():
            here = ray.util.get_node_ip_address()
            for node, address in ingresses or ((here, f"127.0.0.1:{config.grpc_options.port}"),):
                if node == here or not _loopback(address):  # another node's loopback is out of reach
                    _wait_until_answering(address)
    except BaseException:
        stop(Endpoints("", None, tuple(a.name for a in config.applications), local))
        raise
    return Endpoints(
        grpc=f"127.0.0.1:{config.grpc_options.port}",
        metrics=f"http://127.0.0.1:{options.metrics_port}/metrics" if local else None,
        applications=tuple(a.name for a in config.applications),
        local=local,
        ingresses=ingresses,
    )


def on_every_node(config: ServeDeploySchema) -> ServeDeploySchema:
    """The config as it is deployed onto a cluster: an ingress (HAProxy, or Serve's proxy) on every
    node (`proxy_location: EveryNode`), whatever the file says, so each node answers gRPC on its own
    address and a lost node takes only its own ingress with it."""
    if config.proxy_location != ProxyLocation.EveryNode:
        log.warning("proxy_location %s -> EveryNode: a cluster gets an ingress on every node",
                    config.proxy_location.value)  # fmt: skip
    return config.model_copy(update={"proxy_location": ProxyLocation.EveryNode})


def node_ingresses(host: str | None, port: int) -> tuple[tuple[str, str], ...]:
    """Each alive node's gRPC ingress, the head's first: (the node's IP, "host:port" where it listens).

    HAProxy binds the gRPC port on `http_options.host`: on a wildcard host the node's own IP, else
    that host (127.0.0.1: reachable from that node only; a warning says so). Every node binds the
    serve config's port, except a worker node whose Ray was started with
    $RAY_SERVE_WORKER_PROXY_GRPC_PORT (several nodes on one host): Ray reads it in the node's own
    processes, so a zero-CPU task pinned to each node reads it there.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def worker_port() -> str | None:
        return os.environ.get(WORKER_GRPC_PORT_ENV)

    nodes = [n for n in ray.nodes() if n["Alive"]]
    nodes.sort(key=lambda n: HEAD_NODE_RESOURCE_NAME not in n["Resources"])
    pinned = [
        worker_port.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in nodes
    ]
    ready, _ = ray.wait(pinned, num_returns=len(pinned), timeout=30)
    ports: list[str | None] = []
    for ref in pinned:  # a node that does not answer keeps the config's port
        try:
            ports.append(ray.get(ref) if ref in ready else None)
        except ray.exceptions.RayError:
            ports.append(None)
    wildcard = host in (None, "", "0.0.0.0", "::")
    if not wildcard and _loopback(f"{host}:0") and len(nodes) > 1:
        log.warning("every node's gRPC ingress listens on %s only (http_options.host): clients "
                    "on other machines cannot reach it; serve with --host 0.0.0.0", host)  # fmt: skip
    found = []
    for node, own in zip(nodes, ports, strict=True):
        ip = node["NodeManagerAddress"]
        bound = port if HEAD_NODE_RESOURCE_NAME in node["Resources"] or not own else own
        found.append((ip, f"{ip if wildcard else host}:{bound}"))
    return tuple(found)


def _loopback(address: str) -> bool:
    """Whether a "host:port" address is on the loopback interface."""
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _secured(config: ServeDeploySchema) -> ServeDeploySchema:
    """The config as a secured local service runs it.

    With TLS, the gRPC port keeps the config's host (over TLS, `attnserve-haproxy`) while Serve's
    HTTP listeners move to loopback. With tokens, Ray's own reflection service is turned off: Ray
    answers it outside any attnserve code, so it could not ask for a token.
    """
    if ServerTls.from_env():
        os.environ.setdefault(HOST_ENV, config.http_options.host)
        http = config.http_options.model_copy(update={"host": "127.0.0.1"})
        config = config.model_copy(update={"http_options": http})
    if os.environ.get(TOKENS_ENV):
        grpc = config.grpc_options.model_copy(update={"enable_reflection": False})
        config = config.model_copy(update={"grpc_options": grpc})
    return config


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


def _wait_until_answering(address: str, timeout_s: float = 30.0) -> None:
    """Checks health through the gRPC port until it says SERVING: "up" then means answering, and
    the ingress's connection to the replica is open before the first real call."""
    deadline, serving = time.monotonic() + timeout_s, health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):  # UNAVAILABLE while the ingress learns of the replica
                if check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return
            time.sleep(0.1)
    log.warning("the gRPC port %s did not answer health checks within %.0f s", address, timeout_s)


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
