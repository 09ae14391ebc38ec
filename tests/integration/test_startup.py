"""What a client gets while the service starts: from the first moment the gRPC port accepts a
connection, every call gets a real answer or UNAVAILABLE with a plain message, never Ray's
NOT_FOUND "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications ..."
(`attnserve-haproxy` rewrites Ray's HAProxy configuration: service/tls_front.py).

The first tests start `attnserve serve` (plaintext and TLS) and call it in a tight loop, over raw
grpcio without retries, from the moment its port accepts a TCP connection until the first real
answer; the last ones run HAProxy itself through `attnserve-haproxy` on configurations Ray
renders for each state a start-up passes through, the fallback proxy played by a stub server.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.service.client import Client
from attnserve.service.local_ray import free_ports
from attnserve.service.tls import ClientTls
from attnserve.service.tls_front import STARTING_MESSAGE
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.conftest import STARTUP_TIMEOUT_S, launch_service, stop_service

pytestmark = pytest.mark.integration
MODEL, WORD = "g2p-bahdanau", "knight"
CALL_TIMEOUT_S = 10  # a call HAProxy hands to the fallback proxy waits there for the replica
ANSWER_TIMEOUT_S = 120  # from the open port to the first real answer
LEAKS = ("Application metadata", "Ray", "ListApplications")
# Ray's own words, as its HAProxy configuration and its Python proxy say them.
RAY_NOT_FOUND = "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."  # noqa: E501
NO_RETRIES = [("grpc.enable_retries", 0)]


@dataclass(frozen=True)
class Call:
    rpc: str
    start: float  # seconds after the port accepted a connection
    end: float
    code: str
    details: str


def _wait_until_accepting(running, port: int) -> float:
    """The moment the port first accepts a TCP connection (time.monotonic())."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            pytest.fail("attnserve exited before its port opened:\n" + "".join(list(running.lines)[-40:]))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return time.monotonic()
        time.sleep(0.002)
    pytest.fail(
        f"the gRPC port did not open within {STARTUP_TIMEOUT_S} s:\n" + "".join(list(running.lines)[-40:])
    )


def _one(rpc: str, call, opened: float) -> Call:
    start = time.monotonic()
    try:
        call()
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    return Call(rpc, start - opened, time.monotonic() - opened, code, details)


def _calls_until_answered(channel: grpc.Channel, opened: float) -> list[Call]:
    """Translate and Health/Check in turn, back to back, until each has had an OK answer."""
    translator, health = pb_grpc.TranslatorStub(channel), health_pb2_grpc.HealthStub(channel)
    rpcs = {
        "Translate": lambda: translator.Translate(
            pb.TranslateRequest(model=MODEL, text=WORD), timeout=CALL_TIMEOUT_S
        ),
        "Health/Check": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S),
    }
    calls, answered = [], set()
    while answered != set(rpcs):
        seen = collections.Counter((c.rpc, c.code) for c in calls)
        assert time.monotonic() - opened < ANSWER_TIMEOUT_S, f"no answer yet: {seen}"
        for rpc, call in rpcs.items():
            calls.append(_one(rpc, call, opened))
            if calls[-1].code == "OK":
                answered.add(rpc)
    return calls


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory) -> Path:
    """The shipped serve config with one model (a short start)."""
    config = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    config["applications"][0]["args"]["models"] = [MODEL]
    path = tmp_path_factory.mktemp("startup") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def server_certificate(tmp_path_factory) -> dict[str, Path]:
    from attnserve.cli.certs import issue

    folder = tmp_path_factory.mktemp("startup-pki")
    ca = issue("startup test CA")
    server = issue("localhost", ca, ("localhost", "127.0.0.1"))
    files = {"ca": ca.cert, "cert": server.cert, "key": server.key}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_every_call_from_the_open_port_on_gets_a_real_answer_or_unavailable(
    serve_config, server_certificate, tls, capsys
):
    pki = server_certificate
    options = ["--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])] if tls else []
    running = launch_service(serve_config, "--repository", str(BUNDLED_REPOSITORY), *options)
    sdk_outcome: list[str] = []
    try:
        opened = _wait_until_accepting(running, int(running.grpc_address.rsplit(":", 1)[1]))
        client_tls = ClientTls(ca=pki["ca"]) if tls else None
        # The SDK, with its retry policy, calling from the same moment: it must not give up on NOT_FOUND.
        sdk = threading.Thread(target=_sdk_translate, args=(running.grpc_address, client_tls, sdk_outcome))
        sdk.start()
        if tls:
            channel = grpc.secure_channel(running.grpc_address, client_tls.credentials(), options=NO_RETRIES)
        else:
            channel = grpc.insecure_channel(running.grpc_address, options=NO_RETRIES)
        with channel:
            calls = _calls_until_answered(channel, opened)
        sdk.join(60)
    finally:
        stop_service(running)
    first_ok = next(c for c in calls if c.code == "OK")
    counts = collections.Counter((c.rpc, c.code) for c in calls)
    messages = collections.Counter((c.code, c.details) for c in calls if c.code != "OK")
    with capsys.disabled():
        print(
            f"\n[{'tls' if tls else 'plaintext'}] {len(calls)} calls from the open port to the first real "
            f"answers; the first OK call started {first_ok.start:.3f} s and ended {first_ok.end:.3f} s "
            f"after the port opened ({first_ok.rpc}); {dict(counts)}; non-OK answers {dict(messages)}; "
            f"SDK call made at the open port: {sdk_outcome}"
        )
    wrong = [c for c in calls if c.code not in ("OK", "UNAVAILABLE")]
    assert not wrong, f"{len(wrong)} calls got another code, the first: {wrong[0]}"
    leaked = [c for c in calls if any(word in c.details for word in LEAKS)]
    assert not leaked, f"{len(leaked)} answers in Ray's words, the first: {leaked[0]}"
    assert sdk_outcome and sdk_outcome[0] in ("OK", "UNAVAILABLE"), sdk_outcome


def _sdk_translate(address: str, tls: ClientTls | None, outcome: list[str]) -> None:
    try:
        with Client(address, timeout_s=60, tls=tls) as client:
            client.translate(MODEL, WORD)
        outcome.append("OK")
    except grpc.RpcError as e:
        outcome.extend([e.code().name, e.details() or ""])


# HAProxy on the configurations Ray renders while a service starts, the fallback proxy a stub.


class _FallbackProxy(grpc.GenericRpcHandler):
    """Plays Serve's fallback proxy: Healthz "success" for HAProxy's check, Ray's NOT_FOUND for
    Translate (it has not learnt of the application yet) and a replica's NOT_FOUND for ListModels."""

    def __init__(self):
        self.calls = collections.Counter()

    def service(self, details):
        method = details.method
        self.calls[method] += 1
        if method == "/ray.serve.RayServeAPIService/Healthz":
            from ray.serve.generated import serve_pb2

            reply = serve_pb2.HealthzResponse(message="success").SerializeToString()
            return grpc.unary_unary_rpc_method_handler(lambda request, context: reply)
        message = RAY_NOT_FOUND if method.endswith("/Translate") else "no served model is named 'nope'"

        def not_found(request, context):
            context.abort(grpc.StatusCode.NOT_FOUND, message)

        return grpc.unary_unary_rpc_method_handler(not_found)


@pytest.fixture
def fallback_proxy():
    from concurrent.futures import ThreadPoolExecutor

    handler = _FallbackProxy()
    server = grpc.server(ThreadPoolExecutor(4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield handler, port
    server.stop(0)


def _ray_config(folder: Path, grpc_port: int, applications: list[str], fallback_port: int | None) -> Path:
    """The HAProxy configuration Ray 2.60 renders with these gRPC applications, each served by
    the fallback proxy only (no replica has joined yet), on free ports in `folder`."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions, gRPCOptions

    http_port, stats_port, metrics_port = (free_ports() for _ in range(3))
    grpc_options = gRPCOptions(
        port=grpc_port, grpc_servicer_functions=["attnserve.service.grpc_services.add_health_to_server"]
    )
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=http_port), grpc_options=grpc_options,
        socket_path=str(folder / "admin.sock"), stats_port=stats_port, metrics_port=metrics_port,
        metrics_socket_path=str(folder / "metrics.sock"), enable_hap_optimization=False,
    )  # fmt: skip
    api = HAProxyApi(cfg, config_file_path=str(folder / "haproxy.cfg"))
    fallback = ServerConfig("fallback", "127.0.0.1", fallback_port) if fallback_port else None
    backends = {
        f"grpc-{app}": BackendConfig(f"grpc-{app}", "/", app_name=app, fallback_server=fallback,
                                     protocol=RequestProtocol.GRPC)
        for app in applications
    }  # fmt: skip
    api.set_backend_configs(backends)
    api._generate_config_file_internal()
    return folder / "haproxy.cfg"


@contextlib.contextmanager
def _haproxy(config: Path, grpc_port: int):
    """HAProxy started as Ray starts it, through `attnserve-haproxy`; yields a channel to its gRPC port."""
    wrapper = Path(sys.executable).with_name("attnserve-haproxy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_TLS_")}
    log = config.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(wrapper), "-db", "-f", str(config)], stdout=out, stderr=out, env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", grpc_port), 0.5):
                break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=NO_RETRIES) as channel:
            yield channel
    finally:
        proc.terminate()
        proc.wait(10)


def _outcome(rpc, request, metadata=()) -> tuple[str, str]:
    try:
        rpc(request, timeout=10, metadata=metadata)
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def test_haproxy_with_no_application_answers_unavailable_in_plain_words(tmp_path):
    grpc_port = free_ports()
    with _haproxy(_ray_config(tmp_path, grpc_port, [], None), grpc_port) as channel:
        translator, health = pb_grpc.TranslatorStub(channel), health_pb2_grpc.HealthStub(channel)
        translate = pb.TranslateRequest(model=MODEL, text=WORD)
        assert _outcome(translator.Translate, translate) == ("UNAVAILABLE", STARTING_MESSAGE)
        assert _outcome(translator.Translate, translate, (("application", "x"),)) == (
            "UNAVAILABLE",
            STARTING_MESSAGE,
        )
        assert _outcome(health.Check, health_pb2.HealthCheckRequest()) == ("UNAVAILABLE", STARTING_MESSAGE)


def test_haproxy_turns_the_fallback_proxys_not_found_into_unavailable(tmp_path, fallback_proxy):
    proxy, proxy_port = fallback_proxy
    grpc_port = free_ports()
    with _haproxy(_ray_config(tmp_path, grpc_port, ["attnserve"], proxy_port), grpc_port) as channel:
        translator = pb_grpc.TranslatorStub(channel)
        deadline = time.monotonic() + 20
        while not proxy.calls["/attnserve.v1.Translator/Translate"]:  # until HAProxy finds the proxy up
            outcome = _outcome(translator.Translate, pb.TranslateRequest(model=MODEL, text=WORD))
            assert time.monotonic() < deadline, outcome
            time.sleep(0.1)
        assert _outcome(translator.Translate, pb.TranslateRequest(model=MODEL, text=WORD)) == (
            "UNAVAILABLE",
            STARTING_MESSAGE,
        )
        # A NOT_FOUND in other words (a replica's: no such model) is a real answer and passes.
        assert _outcome(translator.ListModels, pb.ListModelsRequest()) == (
            "NOT_FOUND",
            "no served model is named 'nope'",
        )


def test_haproxy_with_several_applications_keeps_not_found_for_a_call_naming_none(tmp_path):
    """With several applications a call without `application` metadata is routed nowhere: NOT_FOUND
    is true there, and the SDK looks the model's application up on it."""
    grpc_port = free_ports()
    with _haproxy(_ray_config(tmp_path, grpc_port, ["words", "images"], None), grpc_port) as channel:
        translate = pb.TranslateRequest(model=MODEL, text=WORD)
        assert _outcome(pb_grpc.TranslatorStub(channel).Translate, translate)[0] == "NOT_FOUND"
