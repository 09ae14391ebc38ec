"""Starts Ray (or joins a cluster), runs the attnserve application and stops it cleanly."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from attnserve.service.app import build_app
from attnserve.service.config import ServeConfig

log = logging.getLogger("attnserve")
APP_NAME = "attnserve"
SERVICER = "attnserve.v1.translator_pb2_grpc.add_TranslatorServicer_to_server"


@dataclass(frozen=True)
class Endpoints:
    """Where the running service answers."""

    grpc: str
    metrics: str | None


def start(config: ServeConfig) -> Endpoints:
    """Starts (or joins) Ray, then Serve with gRPC, and deploys every model; returns when ready."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    local = address is None
    init_args = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if local:
        init_args |= {"num_cpus": config.num_cpus, "_metrics_export_port": config.metrics_port}
    ray.init(address=address, **init_args)
    serve.start(
        http_options=HTTPOptions(host=config.host, port=config.http_port),
        grpc_options=gRPCOptions(port=config.grpc_port, grpc_servicer_functions=[SERVICER]),
    )
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    metrics_url = f"http://127.0.0.1:{config.metrics_port}/metrics" if local else None
    return Endpoints(grpc=f"127.0.0.1:{config.grpc_port}", metrics=metrics_url)


def stop(local: bool) -> None:
    """Removes the application; a local Ray is shut down entirely, a cluster is left running."""
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def serve_until_signalled(config: ServeConfig) -> None:
    """Runs the service until SIGINT or SIGTERM, printing the addresses once it answers."""
    stop_requested = threading.Event()
    local = (config.address or os.environ.get("RAY_ADDRESS")) is None
    endpoints = start(config)
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
        stop(local)
