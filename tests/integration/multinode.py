"""A Ray cluster of several nodes on this one host, built with `ray start` (a head, then workers
that join it), each node with its own raylet, object store, node id and Ray Serve ingress.

On one host every node registers the same IP (the host's own address: Ray 2.60 ignores
`--node-ip-address=127.0.0.1`), so what Ray Serve binds per node must differ per node. Ray 2.60
reads these settings in each node's own processes, so each `ray start` gets them in its environment:

- the serving path's settings (SERVE_ENVIRONMENT: HAProxy direct ingress, throughput-optimized
  replicas), as the images and KubeRay pods carry them, and `attnserve-haproxy` as HAProxy;
- a worker node's HAProxy binds `RAY_SERVE_WORKER_PROXY_GRPC_PORT` / `..._HTTP_PORT` instead of
  the serve config's ports (Ray ignores them on the head), or it could not bind the head's;
- each node's HAProxy stats and Prometheus ports. HAProxy's files already go to a folder per node
  id under `RAY_SERVE_HAPROXY_CONFIG_FILE_LOC`'s folder (which must be short: the node id adds 57
  characters to socket paths HAProxy limits to 97 bytes).

The controller hands out the replicas' direct-ingress ports per node from one range, so two nodes'
first replicas are given the same port. Ray 2.60 means to bind it without SO_REUSEPORT, so that
the second replica finds it taken and is given the next one, but passes the option as the string
"0", which gRPC ignores (it takes integers): both replicas bind the port, HAProxy lists two servers
at one address, and the kernel, not HAProxy, picks the replica of each connection. The cluster's
worker setup hook (`setup_worker`) passes the integer, so each replica has an address of its own,
as on separate machines. There none of this matters: every node binds the same ports.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import psutil

from attnserve.service import worker_setup
from attnserve.service.local_ray import (
    HAPROXY_DIR_PREFIX,
    PORT_BLOCK,
    SERVE_ENVIRONMENT,
    free_ports,
    haproxy_processes,
)

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
PORT_RANGE = 64  # the ports of one cluster (LocalCluster.port)
ROOT = Path(__file__).resolve().parents[2]
SETUP_HOOK = "tests.integration.multinode.setup_worker"  # importable by the workers via PYTHONPATH


def setup_worker() -> None:
    """Every worker of the cluster: attnserve's hook, then replicas' gRPC ports of their own."""
    worker_setup.apply()
    worker_setup.when_imported("ray.serve._private.grpc_util", _exclusive_grpc_ports)


def _exclusive_grpc_ports(grpc_util: ModuleType) -> None:
    """Serve's gRPC servers get `grpc.so_reuseport` as an integer, so 0 turns SO_REUSEPORT off."""
    init = grpc_util.gRPCGenericServer.__init__

    def __init__(self, service_handler_factory, *, extra_options=None):
        options = [(k, int(v) if k == "grpc.so_reuseport" else v) for k, v in extra_options or ()]
        init(self, service_handler_factory, extra_options=options)

    grpc_util.gRPCGenericServer.__init__ = __init__


def _ray_environment(haproxy_dir: Path, port: Callable[[], int]) -> dict[str, str]:
    """What every node of one cluster shares: token auth, the serving path, HAProxy's files, and
    the ports Serve would otherwise take at fixed defaults (replicas' direct ingress, fallback proxy)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env |= {k: v for k, v in SERVE_ENVIRONMENT.items() if k not in os.environ}  # as set_local_environment
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(BIN / "attnserve-haproxy")
    env[worker_setup.SETUP_HOOK_ENV] = SETUP_HOOK
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env |= {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock"),
    }
    grpc, http = [port() for _ in range(PORT_BLOCK)], [port() for _ in range(PORT_BLOCK)]
    env |= {
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc[-1]),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http[-1]),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port()),
    }
    return env


@dataclass
class RayNode:
    """One `ray start --block` and everything it started."""

    name: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path
    grpc_port: int | None  # a worker's own ingress port; None: the serve config's (head)

    def processes(self) -> list[psutil.Process]:
        """`ray start`, its raylet, the agents, the workers and what they started (HAProxy)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        return []

    def raylet(self) -> psutil.Process:
        (raylet,) = [p for p in self.processes() if p.name() == "raylet"]
        return raylet

    def kill(self) -> dict[str, int]:
        """SIGKILL to the raylet and to every process of the node at once (a machine lost);
        returns how many of each kind (by process name) were killed."""
        killed: dict[str, int] = {}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                name = p.name()
                p.kill()
                killed[name] = killed.get(name, 0) + 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        return killed

    def freeze(self) -> int:
        """SIGSTOP to every process of the node (a hung machine, or one cut off by the network, as
        its peers see it: connections are still accepted by the kernel, nothing answers); returns
        how many processes were stopped. `kill` still ends them."""
        stopped = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.suspend()
                stopped += 1
        return stopped

    def stop(self) -> None:
        """SIGTERM to the node's processes, then SIGKILL to what is left after 15 s."""
        procs = self.processes()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


@dataclass
class LocalCluster:
    """A head and worker nodes on this host, all on one node IP, with token auth."""

    workdir: Path
    nodes: list[RayNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Every port the cluster, its nodes and the test need, from one free block: ports chosen
        # one by one are free when chosen, but one may be chosen twice before either is bound.
        first = free_ports(PORT_RANGE)
        self._ports = iter(range(first, first + PORT_RANGE))
        self.gcs_port = self.port()
        # Short: Ray puts each node's HAProxy sockets in a folder named by its node id (56
        # characters), and HAProxy refuses socket paths longer than 97 bytes.
        self.haproxy_dir = Path(tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX))
        self.env = _ray_environment(self.haproxy_dir, self.port)

    def port(self) -> int:
        """A port of the cluster's block no one else was given."""
        return next(self._ports)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.gcs_port}"

    def _start(self, name: str, args: list[str], env: dict[str, str], grpc_port: int | None) -> RayNode:
        log = self.workdir / f"ray-{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={HOST}", "--disable-usage-stats",
               # Workers bind random ports; each node's agent and metrics ports are its own.
               "--min-worker-port=0", "--max-worker-port=0",
               f"--dashboard-agent-listen-port={self.port()}", f"--metrics-export-port={self.port()}",
               *args]  # fmt: skip
        with open(log, "a") as out:
            process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node = RayNode(name, process, env, log, grpc_port)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int) -> RayNode:
        node = self._start(
            "head",
            ["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", "--include-dashboard=false"],
            self._node_env(),
            None,
        )
        self.wait_for_nodes(1, 120)
        return node

    def add_worker(
        self, num_cpus: int, name: str = "worker", grpc_port: int | None = None, own_ports: bool = True
    ) -> RayNode:
        """A worker node joining the head; its ingress answers on `grpc_port` (a free one if None).
        Without `own_ports` its ingress is left on the serve config's ports, as on another machine."""
        env = self._node_env()
        if own_ports:
            grpc_port = grpc_port or self.port()
            env["RAY_SERVE_WORKER_PROXY_GRPC_PORT"] = str(grpc_port)
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(self.port())
        else:
            grpc_port = None
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", "--include-log-monitor=false"]
        return self._start(name, args, env, grpc_port)

    def _node_env(self) -> dict[str, str]:
        return self.env | {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(self.port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.port()),
        }

    def status(self) -> str:
        """`ray status` of the cluster."""
        done = subprocess.run(
            [str(BIN / "ray"), "status", f"--address={self.address}"],
            capture_output=True, text=True, env=self.env, timeout=60,
        )  # fmt: skip
        return done.stdout if done.returncode == 0 else ""

    def alive_nodes(self) -> int:
        """Nodes `ray status` lists as active."""
        text = self.status()
        active = text.split("Active:", 1)[1].split("Pending:", 1)[0] if "Active:" in text else ""
        return sum(1 for line in active.splitlines() if " node_" in line)

    def wait_for_nodes(self, count: int, timeout_s: float) -> float:
        """Waits until `ray status` lists `count` active nodes; returns the seconds it took."""
        started = time.monotonic()
        while self.alive_nodes() != count:
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"{count} nodes not active after {timeout_s:g} s; logs in {self.workdir}")
            time.sleep(0.5)
        return time.monotonic() - started

    def close(self) -> None:
        """Stops every node, workers first, and any HAProxy of this cluster that is left."""
        for node in reversed(self.nodes):
            node.stop()
        for p in haproxy_processes(str(self.haproxy_dir)):
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(self.haproxy_dir, ignore_errors=True)


# A driver that prints, every PERIOD s, one JSON line: the alive nodes, where each replica of
# every application is and its state, and each node's Serve proxy (ingress) and its status.
PROBE = """
import json, sys, time, ray
from ray.serve.context import _get_global_client
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps({"driver_node": ray.get_runtime_context().get_node_id()}), flush=True)
while True:
    line = {"t": time.time(), "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}
    try:
        details = _get_global_client().get_serve_details()
        line["replicas"] = [
            {"node": r.get("node_id"), "state": r["state"], "id": r["replica_id"], "pid": r.get("pid")}
            for app in details.get("applications", {}).values()
            for deployment in app["deployments"].values()
            for r in deployment["replicas"]
        ]
        line["proxies"] = {node: p["status"] for node, p in details.get("proxies", {}).items()}
    except Exception as e:
        line["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(line), flush=True)
    time.sleep(float(sys.argv[2]))
"""


@dataclass
class Probe:
    """The PROBE driver, run beside a test; `lines` fills as it prints."""

    address: str
    env: dict[str, str]
    period_s: float = 0.5
    lines: list[dict] = field(default_factory=list)

    def __enter__(self) -> Probe:
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROBE, self.address, str(self.period_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        for line in self.process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.lines.append(json.loads(line))

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def latest(self) -> dict:
        """The last line that has the replicas (a call to the controller can fail)."""
        return next((line for line in reversed(self.lines) if "replicas" in line), {})

    def errors(self) -> dict[str, int]:
        """The probe's failed looks at Serve, by message."""
        found: dict[str, int] = {}
        for line in self.lines:
            if "error" in line:
                found[line["error"][:160]] = found.get(line["error"][:160], 0) + 1
        return found

    def wait_for(self, predicate, timeout_s: float, what: str, since: float | None = None) -> dict:
        """The first line that satisfies the predicate: printed from now on, or at `since`
        (a time.time()) and later."""
        seen, deadline = 0 if since is not None else len(self.lines), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if "t" in line and (since is None or line["t"] >= since) and predicate(line):
                    return line
            seen = len(self.lines)
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}; last: {self.latest()}")


def haproxy_servers(haproxy_dir: Path, node_id: str) -> dict[str, dict[str, str]]:
    """The servers of a node's HAProxy (`show stat` on its admin socket): "backend/server" ->
    its address, status and sessions so far (stot)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(haproxy_dir / node_id / "admin.sock"))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    header, *rows = data.decode().strip().splitlines()
    names = header.lstrip("# ").split(",")
    servers = {}
    for row in csv.DictReader(rows, fieldnames=names):
        if row["svname"] not in ("FRONTEND", "BACKEND"):
            servers[f"{row['pxname']}/{row['svname']}"] = {k: row[k] for k in ("addr", "status", "stot")}
    return servers


def running_replicas(line: dict) -> list[str]:
    """The nodes of the RUNNING replicas in a probe line (one entry per replica)."""
    return [r["node"] for r in line.get("replicas", []) if r["state"] == "RUNNING"]
