"""`attnserve serve` with RAY_ADDRESS deploys onto a running Ray cluster and leaves it running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from attnserve.service.client import Client
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(1)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left (ray start leaves gcs_server behind).

    Ray's workers run in sessions of their own, so they are collected as descendants first.
    """
    workers = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=60)
    for worker in alive:
        worker.kill()


@pytest.fixture
def ray_cluster(tmp_path):
    """A single-node Ray cluster with token auth, in its own process group."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the head, its clients and attnserve agree
    with open(tmp_path / "ray-head.log", "w") as log:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        probe = [str(BIN / "ray"), "status", f"--address={address}"]
        ready = lambda: subprocess.run(probe, capture_output=True, env=env).returncode == 0  # noqa: E731
        _wait_for(ready, 120, f"the Ray head (log: {tmp_path / 'ray-head.log'})")
        yield address, probe, env
    finally:
        _stop_group(head)


def test_serve_deploys_onto_an_existing_cluster_and_leaves_it_running(ray_cluster):
    address, probe, cluster_env = ray_cluster
    grpc_port = free_port()
    env = {**cluster_env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    cmd = [
        str(BIN / "attnserve"), "serve", "--serve-config", str(ROOT / "deploy/serve/attnserve.yaml"),
        "--repository", str(BUNDLED_REPOSITORY),
        "--grpc-port", str(grpc_port), "--http-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "attnserve is up" in line or proc.poll() is not None:
                break
        assert any("attnserve is up" in line for line in lines), "".join(lines[-30:])
        assert not any("Prometheus metrics:" in line for line in lines)  # the cluster's own endpoint
        with Client(f"127.0.0.1:{grpc_port}", timeout_s=60) as client:
            assert client.translate("g2p-bahdanau", "cluster").output_tokens
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert subprocess.run(probe, capture_output=True, env=cluster_env).returncode == 0, "the cluster stays up"
    list_apps = (
        f"import ray; from ray import serve; ray.init(address='{address}', log_to_driver=False); "
        "print(sorted(serve.status().applications))"
    )
    apps = subprocess.run(
        [sys.executable, "-c", list_apps], capture_output=True, text=True, timeout=120, env=cluster_env
    )
    assert apps.stdout.strip().splitlines()[-1] == "[]", apps.stdout + apps.stderr
