"""`attnserve serve` with RAY_ADDRESS deploys onto a running Ray cluster and leaves it running; a
user_config edit applied there swaps model versions in place."""

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
import yaml

from attnserve.bench.version_memory import copy_as_version
from attnserve.service.client import Client
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.callers import Callers
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


APPLY_CONFIG = """
import sys
import ray
from ray.serve._private import api as serve_api
from attnserve.service.config import LocalOptions, load_serve_config
ray.init(address=sys.argv[1], log_to_driver=False)
options = LocalOptions(serve_config=sys.argv[2], model_repository=sys.argv[3], grpc_port=int(sys.argv[4]),
                       http_port=int(sys.argv[5]))
serve_api.serve_start().deploy_apps(load_serve_config(options))  # what `serve deploy` sends
"""


def _serve_config(path: Path, user_config: dict) -> Path:
    """The shipped CPU config with one model version in `args` and `user_config` as given."""
    raw = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    (app,) = raw["applications"]
    app["args"]["serving"]["versions"] = {"versions": [1]}
    app["deployments"][0]["user_config"] = {**app["args"]["serving"], **user_config}
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def _service_on(address: str, cluster_env: dict, serve_config: Path, repository: Path):
    """`attnserve serve` onto the cluster; yields (its gRPC address, its ports)."""
    grpc_port, http_port = free_port(), free_port()
    env = {**cluster_env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "attnserve"), "serve", "--serve-config", str(serve_config), "--repository",
           str(repository), "--grpc-port", str(grpc_port), "--http-port", str(http_port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if "attnserve is up" in line or proc.poll() is not None:
                break
        yield f"127.0.0.1:{grpc_port}", (grpc_port, http_port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)


def _apply(address: str, cluster_env: dict, serve_config: Path, repository: Path, ports) -> None:
    """Deploys an edited config onto the cluster the way `serve deploy` does."""
    edit = [sys.executable, "-c", APPLY_CONFIG, address, str(serve_config), str(repository), *map(str, ports)]
    applied = subprocess.run(edit, capture_output=True, text=True, timeout=120, env=cluster_env)
    assert applied.returncode == 0, applied.stderr[-2000:]


@pytest.fixture
def two_versions(tmp_path) -> Path:
    repository = tmp_path / "repository"
    for version in (1, 2):
        copy_as_version(BUNDLED_REPOSITORY / "g2p-bahdanau" / "1", repository, version)
    return repository


def test_a_user_config_edit_swaps_versions_in_place_under_load_with_no_failed_call(
    ray_cluster, tmp_path, two_versions
):
    address, _, cluster_env = ray_cluster
    before = _serve_config(tmp_path / "before.yaml", {"versions": {"versions": [1]}})
    after = _serve_config(
        tmp_path / "after.yaml", {"versions": {"all": True}, "traffic": {"g2p-bahdanau": {2: 1}}}
    )
    with (
        _service_on(address, cluster_env, before, two_versions) as (target, ports),
        Callers(target, "g2p-bahdanau", raw=8).running() as callers,
    ):
        time.sleep(2)
        _apply(address, cluster_env, after, two_versions, ports)
        _wait_for(lambda: "2" in callers.versions("raw"), 60, "version 2 to take the calls")
        time.sleep(1)
    print(f"\nuser_config edit: {dict(callers.codes('raw'))}, by version {dict(callers.versions('raw'))}")
    assert set(callers.codes("raw")) == {"OK"} and callers.versions("raw")["1"]


def test_a_rolling_update_fails_no_sdk_call_and_raw_calls_see_only_unavailable(
    ray_cluster, tmp_path, two_versions
):
    address, _, cluster_env = ray_cluster
    before = _serve_config(tmp_path / "before.yaml", {})
    raw = yaml.safe_load(before.read_text())
    raw["applications"][0]["args"]["runtime"]["intra_op_threads"] = 1  # args change: new replicas
    after = tmp_path / "after.yaml"
    after.write_text(yaml.safe_dump(raw))
    with (
        _service_on(address, cluster_env, before, two_versions) as (target, ports),
        Callers(target, "g2p-bahdanau", sdk=4, raw=4).running() as callers,
    ):
        time.sleep(2)
        started = len(callers.calls["raw"])
        _apply(address, cluster_env, after, two_versions, ports)
        time.sleep(25)  # the rollout: a new replica loads and warms up, the old one drains
    print(
        f"\nrolling update: raw {dict(callers.codes('raw'))} (from {started} calls before it), "
        f"SDK {dict(callers.codes('sdk'))}"
    )
    assert set(callers.codes("sdk")) == {"OK"}, callers.failures("sdk")[:5]
    assert set(callers.codes("raw")) <= {"OK", "UNAVAILABLE"}, callers.failures("raw")[:5]
