"""Keeps Ray Serve's plaintext gRPC servers on loopback when TLS is on in a local Ray.

Ray Serve 2.60 binds two gRPC servers that answer attnserve's rpcs in plaintext to `[::]`, with
no setting to narrow them: each replica's direct-ingress server (HAProxy's backend) and the
fallback proxy (HAProxy's backup server). Behind a TLS front they must not be reachable from
outside the host. In `attnserve serve` (a local, single-node Ray) every Ray worker runs `apply`
at start-up, from Ray's worker process setup hook (worker_setup.py), before Serve binds anything.
HAProxy reaches replicas on its own node through the loopback address, so nothing else changes.

A multi-node cluster (KubeRay) cannot use this: HAProxy reaches replicas on other nodes by their
node address. There the pod network and a NetworkPolicy keep those ports private (deploy/kubernetes).
"""

from __future__ import annotations

import os

PRIVATE_HOST_ENV = "ATTNSERVE_PRIVATE_HOST"  # e.g. 127.0.0.1; unset: Ray's own binds
WILDCARD = "[::]:"


def private_address(address: str, host: str) -> str:
    """`[::]:PORT` on `host` instead; any other address unchanged."""
    return f"{host}:{address[len(WILDCARD) :]}" if address.startswith(WILDCARD) else address


def apply() -> None:
    """Makes Ray Serve's gRPC servers in this process bind $ATTNSERVE_PRIVATE_HOST (if set)."""
    host = os.environ.get(PRIVATE_HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl  # Serve looks it up at every bind

    original = default_impl.add_grpc_address

    def add_grpc_address(server, address: str):
        return original(server, private_address(address, host))

    default_impl.add_grpc_address = add_grpc_address


def local_environment(host: str = "127.0.0.1") -> dict[str, str]:
    """The environment that turns this on for a local Ray's workers (with worker_setup's hook)."""
    return {PRIVATE_HOST_ENV: host}
