"""Starts the real `attnserve serve` (local Ray + Ray Serve + gRPC) once for the integration tests."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from attnserve.service.local_ray import free_ports
from tests.conftest import BUNDLED_REPOSITORY, BYOM_IMAGES, BYOM_TEXT, ROOT

STARTUP_TIMEOUT_S = 240
KEPT_LINES = 5000
BYOM_MODEL, BYOM_IMAGE_MODEL = "names-en-fr", "fashion-scenes"
SERVE_CONFIG = ROOT / "deploy/serve/attnserve.yaml"


def served_translator(manifest):
    """The model as the service runs it (the serve config's runtime: precision included), in-process."""
    from attnserve.core.model_runner import ModelRunner
    from attnserve.service.config import app_args

    return ModelRunner(manifest, app_args(SERVE_CONFIG).runtime.runtime_config())


def free_port() -> int:
    """A TCP port nobody listens on now, outside the range where Ray's processes bind theirs."""
    return free_ports()


@dataclass
class RunningService:
    """A service started by the tests, with the last KEPT_LINES lines it printed and whether it
    said it is up (kept apart, so a service that prints without end cannot fill the test runner's
    memory or push that line out)."""

    process: subprocess.Popen
    grpc_address: str
    metrics_url: str
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=KEPT_LINES))
    up: threading.Event = field(default_factory=threading.Event)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _pump(stream, running: RunningService) -> None:
    for line in stream:
        running.lines.append(line)
        if "attnserve is up" in line:
            running.up.set()


@pytest.fixture(scope="session")
def served_repository(tmp_path_factory) -> Path:
    """The bundled models plus two a user brings (parallel text, images with captions): each
    trained for a few steps on the shipped examples and exported with the CLI, as the README's
    "Bring your own model" section does."""
    repo = tmp_path_factory.mktemp("served-repository")
    for entry in BUNDLED_REPOSITORY.iterdir():
        if entry.is_dir():
            (repo / entry.name).symlink_to(entry)
    exe = str(Path(sys.executable).with_name("attnserve"))
    byom = {
        BYOM_MODEL: ["--task", "parallel-text", "--data", str(BYOM_TEXT), "--architecture", "luong-gru",
                     "--set", "hidden_size=32", "--set", "embed_size=16"],
        BYOM_IMAGE_MODEL: ["--task", "image-captions", "--data", str(BYOM_IMAGES),
                           "--architecture", "captioner-lstm", "--set", "channels=[8,16]",
                           "--set", "decoder_size=32", "--set", "attention_size=16"],
    }  # fmt: skip
    for name, options in byom.items():
        run = tmp_path_factory.mktemp(f"byom-{name}")
        train = [exe, "train", *options, "--out", str(run), "--epochs", "1", "--batch-size", "32",
                 "--threads", "1"]  # fmt: skip
        export = [exe, "export", str(run / "checkpoint.pt"), "--repository", str(repo), "--name", name]
        for cmd in (train, export):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
    return repo


def launch_service(serve_config: Path, *options: str) -> RunningService:
    """`attnserve serve` with a serve config and options, on free local ports; returns at once.

    It runs in a session of its own, so a test can signal the service's whole process group.
    """
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    cmd = [
        str(Path(sys.executable).with_name("attnserve")), "serve", "--serve-config", str(serve_config),
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--http-port", str(http_port),
        *options,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    running = RunningService(proc, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics")
    threading.Thread(target=_pump, args=(proc.stdout, running), daemon=True).start()
    return running


def start_service(serve_config: Path, *options: str) -> RunningService:
    """`attnserve serve` as launch_service starts it; waits until it says it is up."""
    running = launch_service(serve_config, *options)
    proc = running.process
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not running.up.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("attnserve did not start:\n" + "".join(list(running.lines)[-40:]))
    return running


def stop_service(running: RunningService, timeout_s: float = 60) -> int | None:
    """SIGTERM to the service, then SIGKILL to whatever of it is left; its exit status."""
    children = running.descendants()
    running.process.send_signal(signal.SIGTERM)
    try:
        code = running.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        running.process.kill()
        code = None
    for child in children:
        if child.is_running():
            child.kill()
    return code


@pytest.fixture(scope="session")
def service(served_repository) -> RunningService:
    """`attnserve serve` on the served repository, on free local ports, with a 20 ms batch timer."""
    running = start_service(SERVE_CONFIG, "--repository", str(served_repository), "--batch-wait-ms", "20")
    proc = running.process
    yield running
    if proc.poll() is None:  # a test failed before the shutdown test ran
        children = running.descendants()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
