"""Ray Serve autoscaling on the real service (`make autoscale-test`, ~3 min; slow, not in `make test`).

`attnserve serve --autoscale 1:2` on a local Ray of 2 CPUs (1 CPU per replica), one model, with a
low target of calls in flight per replica and short upscale/downscale delays set in the serve
config (Ray's metric push interval and 30 s look-back window stay at their defaults). Closed-loop
raw grpcio callers (no retries) load it: it must grow to 2 replicas, both taking calls in HAProxy,
within 30 s of the load starting; when the load drops to a trickle below the target it must shrink
back to 1, the trickle running on through the scale-down. Raw callers may see UNAVAILABLE on at
most 0.5 % of their calls, and no other failure. Replicas are counted where calls are routed: the
UP replica servers of the service's HAProxy (`show stat` on its admin socket).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from attnserve.service.local_ray import HAPROXY_DIR_PREFIX, free_ports
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.callers import Callers

pytestmark = pytest.mark.slow
MODEL = "g2p-bahdanau"
TARGET_ONGOING = 4  # calls in flight per replica
LOAD_CALLERS, TRICKLE_CALLERS = 24, 2  # closed loop: ~24 in flight, then ~2 (below the target)
GROW_WITHIN_S = 30.0
SHRINK_WITHIN_S = 150.0
AUTOSCALING = {"target_ongoing_requests": TARGET_ONGOING, "upscale_delay_s": 2.0, "downscale_delay_s": 5.0}
STARTUP_TIMEOUT_S = 240


def _serve_config(path: Path) -> Path:
    """The shipped CPU config with one model, replicas of 1 CPU, and the test's autoscaling settings
    (min and max come from --autoscale)."""
    raw = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    (app,) = raw["applications"]
    app["args"]["models"] = [MODEL]
    app["args"]["replica"] |= {"num_replicas": 1, "num_cpus": 1, "autoscaling": AUTOSCALING}
    path.write_text(yaml.safe_dump(raw))
    return path


class Service:
    """`attnserve serve --autoscale 1:2` on a local Ray of 2 CPUs, its HAProxy files in a folder
    the test knows."""

    def __init__(self, serve_config: Path, log: Path):
        self.haproxy_dir = Path(tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX))  # the supervisor removes it
        self.port = free_ports()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "PYTHONUNBUFFERED": "1",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(self.haproxy_dir / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(self.haproxy_dir / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(self.haproxy_dir),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(self.haproxy_dir / "server-state"),
        }
        cmd = [str(Path(sys.executable).with_name("attnserve")), "serve", "--serve-config", str(serve_config),
               "--repository", str(BUNDLED_REPOSITORY), "--autoscale", "1:2", "--num-cpus", "2",
               "--grpc-port", str(self.port), "--metrics-port", str(free_ports()),
               "--http-port", str(free_ports())]  # fmt: skip
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "attnserve is up" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("attnserve serve did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def replica_servers(self) -> dict[str, dict[str, str]]:
        """The replica servers of the service's HAProxy: name -> status and sessions so far."""
        (sock,) = self.haproxy_dir.glob("*/admin.sock")  # Ray's folder per node
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        header, *rows = data.decode().strip().splitlines()
        found = {}
        for row in csv.DictReader(rows, fieldnames=header.lstrip("# ").split(",")):
            if row["pxname"].startswith("grpc-") and row["svname"].startswith("SERVE_REPLICA"):
                found[row["svname"]] = {"status": row["status"], "stot": row["stot"]}
        return found

    def routed_replicas(self) -> int:
        """Replica servers HAProxy routes calls to (UP); -1 while its socket does not answer."""
        try:
            return sum(s["status"].startswith("UP") for s in self.replica_servers().values())
        except (OSError, ValueError):
            return -1

    def replica_processes(self) -> int:
        with contextlib.suppress(psutil.Error):
            return sum(
                "ServeReplica:attnserve" in " ".join(p.cmdline())
                for p in psutil.Process(self.process.pid).children(recursive=True)
                if p.is_running()
            )
        return -1

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Watch:
    """Samples the routed replicas and the replica processes every 0.25 s in a thread."""

    def __init__(self, service: Service):
        self.service, self.samples, self.stop = service, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(
                (time.time(), self.service.routed_replicas(), self.service.replica_processes())
            )
            time.sleep(0.25)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)

    def first(self, routed: int, since: float, timeout_s: float) -> float | None:
        """When (time.time()) the routed replicas first were `routed` at or after `since`; None if
        not within timeout_s of it."""
        deadline = time.monotonic() + timeout_s - (time.time() - since)
        while True:
            hit = next((t for t, r, _ in list(self.samples) if t >= since and r == routed), None)
            if hit is not None or time.monotonic() > deadline:
                return hit
            time.sleep(0.25)


def _ok_per_s(callers: Callers, start: float, end: float) -> float:
    done = sum(1 for _, e, code, _ in callers.calls["raw"] if start <= e < end and code == "OK")
    return round(done / max(end - start, 1e-9), 1)


def test_grows_to_2_replicas_under_load_and_shrinks_back_with_no_failed_call(tmp_path):
    service = Service(_serve_config(tmp_path / "autoscale.yaml"), tmp_path / "serve.log")
    figures: dict = {
        "autoscaling": AUTOSCALING,
        "load_callers": LOAD_CALLERS,
        "trickle_callers": TRICKLE_CALLERS,
    }
    try:
        service.wait_until_up()
        with Watch(service) as watch:
            time.sleep(2)
            assert service.routed_replicas() == 1 and service.replica_processes() == 1, (
                service.replica_servers()
            )
            trickle = Callers(service.address, MODEL, raw=TRICKLE_CALLERS, text="trickle")
            load = Callers(service.address, MODEL, raw=LOAD_CALLERS, text="autoscale")
            with trickle.running():
                with load.running():
                    load_at = time.time()
                    grown = watch.first(2, load_at, GROW_WITHIN_S + 30)
                    if grown is not None:
                        time.sleep(15)  # 2 replicas under the same load
                    load_end = time.time()
                    routed_under_load = service.replica_servers()
                shrunk = watch.first(1, load_end, SHRINK_WITHIN_S)
                time.sleep(5)  # the trickle goes on after the scale-down
            ended = time.time()
            last = watch.samples[-1]
        grown_processes = next((t for t, _, p in watch.samples if t >= load_at and p == 2), None)
        figures |= {
            "grew_to_2_routed_s": None if grown is None else round(grown - load_at, 1),
            "second_replica_process_s": None
            if grown_processes is None
            else round(grown_processes - load_at, 1),
            "shrank_to_1_routed_s_after_load_end": None if shrunk is None else round(shrunk - load_end, 1),
            "sessions_per_replica_under_load": {k: v["stot"] for k, v in routed_under_load.items()},
            "load_ok_per_s": {
                "1 replica": _ok_per_s(load, load_at, grown or load_end),
                "2 replicas (last 12 s)": _ok_per_s(load, load_end - 12, load_end) if grown else None,
            },
            "load_codes": dict(load.codes("raw")),
            "trickle_codes": dict(trickle.codes("raw")),
            "after": {"routed": last[1], "replica_processes": last[2]},
        }
        failures = load.failures("raw") + trickle.failures("raw")
        total = len(load.calls["raw"]) + len(trickle.calls["raw"])
        figures["failures"] = dict(Counter(f"{code}: {details[:80]}" for *_, code, details in failures))
        figures["failed_share"] = round(len(failures) / max(total, 1), 5)
        figures["test_s"] = round(ended - load_at, 1)
        print("\nautoscaling figures:\n" + json.dumps(figures, indent=2))
    finally:
        service.stop()

    assert grown is not None and grown - load_at <= GROW_WITHIN_S, figures
    assert len(routed_under_load) == 2 and all(int(v["stot"]) > 0 for v in routed_under_load.values()), (
        figures
    )
    assert shrunk is not None, figures
    assert figures["after"] == {"routed": 1, "replica_processes": 1}, figures
    assert {code for *_, code, _ in failures} <= {"UNAVAILABLE"}, figures["failures"]
    assert figures["failed_share"] <= 0.005, figures
