"""The secured service over real sockets: TLS, mutual TLS and bearer tokens on `attnserve serve`.

One service (local Ray, HAProxy through attnserve-haproxy, g2p-bahdanau only) serves the whole
module with a server certificate, a client CA and a token file, all made here with the
`cryptography` package. The token counts are checked first, on a fresh service; the reloads
(tokens, certificate) and the leak checks come last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from attnserve.cli.certs import Issued, issue
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc
from tests.conftest import BUNDLED_REPOSITORY, ROOT
from tests.integration.conftest import RunningService, start_service

pytestmark = pytest.mark.integration
MODEL = "g2p-bahdanau"
ALICE, BOB, CAROL = "alice-7d1f0c9e4b2a8f35", "bob-2c8e5a1d9f3b7e60", "carol-5b9d3f7a1c8e2d46"
WRONG = "mallory-0000000000000000"
LONG = "x" * 5000  # beyond the 4 KiB a token may have, within gRPC's 8 KiB of metadata
NAMES = ("localhost", "127.0.0.1")
RELOAD_WAIT_S = 15


def _write(folder: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    (folder / f"{stem}.crt").write_bytes(issued.cert)
    (folder / f"{stem}.key").write_bytes(issued.key)
    return folder / f"{stem}.crt", folder / f"{stem}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """The service's CA (server and client certificates), a stranger CA (a client certificate it
    signed) and a second CA whose server certificate replaces the first one later."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger, renewed = issue("test CA"), issue("stranger CA"), issue("renewed CA")
    paths = {}
    for stem, issued in (("ca", ca), ("stranger-ca", stranger), ("renewed-ca", renewed),
                         ("server", issue("localhost", ca, NAMES)),
                         ("client", issue("client", ca, client=True)),
                         ("stranger-client", issue("stranger", stranger, client=True)),
                         ("renewed-server", issue("localhost", renewed, NAMES))):  # fmt: skip
        paths[stem], paths[f"{stem}-key"] = _write(folder, stem, issued)
    return paths


@pytest.fixture(scope="module")
def secured(pki, tmp_path_factory) -> RunningService:
    """`attnserve serve` with TLS, mutual TLS and a token file, serving g2p-bahdanau."""
    folder = tmp_path_factory.mktemp("secured")
    tokens = folder / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    config = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    config["applications"][0]["args"]["models"] = [MODEL]
    (folder / "serve.yaml").write_text(yaml.safe_dump(config))
    running = start_service(
        folder / "serve.yaml", "--repository", str(BUNDLED_REPOSITORY), "--tls-cert", str(pki["server"]),
        "--tls-key", str(pki["server-key"]), "--tls-client-ca", str(pki["ca"]), "--auth-tokens", str(tokens),
    )  # fmt: skip
    running.tokens = tokens
    yield running
    children = running.descendants()
    running.process.send_signal(signal.SIGTERM)
    try:
        running.process.wait(60)
    except subprocess.TimeoutExpired:
        running.process.kill()
    for child in children:
        if child.is_running():
            child.kill()


def _channel(
    address: str, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
    )
    return grpc.secure_channel(address, creds)


def _mtls(secured, pki, ca: str = "ca") -> grpc.Channel:
    return _channel(secured.grpc_address, pki[ca], pki["client"], pki["client-key"])


def _health(channel: grpc.Channel) -> str:
    """The health Check's status name, or the error code's name."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        return e.code().name


def _translate(channel: grpc.Channel, metadata=(), text: str = "secure") -> tuple[str, str]:
    """(code name, text or details) of one Translate call."""
    stub = pb_grpc.TranslatorStub(channel)
    try:
        reply = stub.Translate(pb.TranslateRequest(model=MODEL, text=text), timeout=10, metadata=metadata)
        return "OK", reply.text
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _auth_failures(metrics_url: str) -> Counter:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    counts = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "ray_attnserve_auth_failures":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["reason"]] += sample.value
    return counts


def test_missing_empty_wrong_truncated_and_long_tokens_are_unauthenticated_and_counted(secured, pki):
    calls = {"missing": (), "empty": (("authorization", "Bearer "),), "wrong": _bearer(WRONG),
             "truncated": _bearer(ALICE[:-3]), "long": _bearer(LONG)}  # fmt: skip
    with _mtls(secured, pki) as channel:
        for case, metadata in calls.items():
            code, details = _translate(channel, metadata)
            assert code == "UNAUTHENTICATED", (case, code, details)
            assert "token" in details and ALICE[:-3] not in details and "x" * 100 not in details
    expected = Counter(missing=1, malformed=2, unknown=2)  # empty and too long are malformed
    deadline = time.monotonic() + 30  # Ray pushes counters every few seconds
    while (got := _auth_failures(secured.metrics_url)) != expected and time.monotonic() < deadline:
        time.sleep(1)
    assert got == expected


def test_a_valid_token_is_served_and_health_needs_none(secured, pki):
    with _mtls(secured, pki) as channel:
        code, text = _translate(channel, _bearer(ALICE))
        assert code == "OK" and text
        listed = pb_grpc.TranslatorStub(channel).ListModels(pb.ListModelsRequest(), metadata=_bearer(BOB))
        assert [m.name for m in listed.models] == [MODEL]
        assert _health(channel) == "SERVING"


def test_reflection_reveals_nothing_without_a_token(secured, pki):
    with _mtls(secured, pki) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert failed.value.code() != grpc.StatusCode.OK


def test_plaintext_to_the_tls_port_fails(secured):
    with _channel(secured.grpc_address, None) as channel:
        assert _health(channel) == "UNAVAILABLE"
        assert _translate(channel, _bearer(ALICE))[0] == "UNAVAILABLE"


def test_a_client_that_trusts_another_ca_refuses_the_server(secured, pki):
    with _channel(secured.grpc_address, pki["stranger-ca"], pki["client"], pki["client-key"]) as channel:
        assert _health(channel) == "UNAVAILABLE"


@pytest.mark.parametrize("client", [None, "stranger-client"])
def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(secured, pki, client):
    cert, key = (pki[client], pki[f"{client}-key"]) if client else (None, None)
    with _channel(secured.grpc_address, pki["ca"], cert, key) as channel:
        assert _health(channel) == "UNAVAILABLE"
        assert _translate(channel, _bearer(ALICE))[0] == "UNAVAILABLE"


def _listeners(secured: RunningService) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of the service's processes."""
    found = set()
    for p in [psutil.Process(secured.process.pid), *secured.descendants()]:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == "LISTEN"}
        except psutil.Error:
            continue
    return found


def _answers_plaintext(ip: str, port: int) -> bool:
    """Whether attnserve answers there in plaintext: a health check of its Translator service, or a
    Translate with a valid token (Ray's own servers answer neither)."""
    host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="attnserve.v1.Translator")
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
            return True
        except grpc.RpcError:
            pass
        try:
            pb_grpc.TranslatorStub(channel).Translate(
                pb.TranslateRequest(model=MODEL, text="leak"), timeout=2, metadata=_bearer(ALICE)
            )
            return True
        except grpc.RpcError:
            return False


def _answering(listeners) -> list[tuple[str, int]]:
    """The listeners where attnserve answers in plaintext."""
    listeners = sorted(listeners)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda hp: _answers_plaintext(*hp), listeners))
    return [hp for hp, yes in zip(listeners, answers, strict=True) if yes]


def test_nothing_of_the_service_answers_in_plaintext_beyond_loopback(secured):
    listeners = _listeners(secured)
    loopback = {(ip, port) for ip, port in listeners if ip.startswith(("127.", "::ffff:127.")) or ip == "::1"}
    exposed = listeners - loopback
    assert exposed, "the local Ray's own ports (GCS, raylet, metrics) bind all interfaces"
    assert _answering(exposed) == []
    # Behind the TLS port, on loopback: the replica's and the fallback proxy's plaintext servers.
    assert _answering(loopback)


def _wait_for(check, timeout_s: float = RELOAD_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def _replace(path: Path, data: bytes) -> None:
    """Replaces a file atomically, as a secret update or a certificate renewal does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_token_revoked_in_the_file_stops_working_without_a_restart(secured, pki):
    _replace(secured.tokens, f"bob:{BOB}\ncarol:{CAROL}\n".encode())
    with _mtls(secured, pki) as channel:
        assert _wait_for(lambda: _translate(channel, _bearer(ALICE))[0] == "UNAUTHENTICATED")
        assert _translate(channel, _bearer(CAROL))[0] == "OK"
        assert _translate(channel, _bearer(BOB))[0] == "OK"


def test_a_renewed_server_certificate_is_served_without_a_restart(secured, pki):
    _replace(pki["server-key"], pki["renewed-server-key"].read_bytes())
    _replace(pki["server"], pki["renewed-server"].read_bytes())

    def renewed() -> bool:
        with _mtls(secured, pki, ca="renewed-ca") as channel:
            return _health(channel) == "SERVING"

    assert _wait_for(renewed)
    with _mtls(secured, pki) as channel:  # the old CA no longer vouches for the server
        assert _health(channel) == "UNAVAILABLE"
    with _mtls(secured, pki, ca="renewed-ca") as channel:
        assert _translate(channel, _bearer(BOB))[0] == "OK"


def _ray_session_logs(secured: RunningService) -> list[Path]:
    """The log files of the service's Ray session (the one its serving child drives)."""
    pids = {str(p.pid) for p in secured.descendants()}
    drivers = (Path(tempfile.gettempdir()) / "ray").glob("session_*/logs/python-core-driver-*.log")
    sessions = {log.parents[1] for log in drivers if log.stem.rsplit("_", 1)[-1] in pids}
    assert sessions, "the service's Ray session was not found"
    return [f for s in sessions for f in (s / "logs").rglob("*") if f.is_file()]


def test_no_token_appears_in_logs_or_metrics(secured):
    with urllib.request.urlopen(secured.metrics_url, timeout=10) as r:
        texts = {"metrics": r.read().decode(), "output": "".join(secured.lines)}
    for path in _ray_session_logs(secured):
        texts[str(path)] = path.read_text("utf-8", errors="replace")
    for token in (ALICE, BOB, CAROL, WRONG, ALICE[:-3], LONG):
        leaked = [name for name, text in texts.items() if token in text]
        assert leaked == [], f"a token appears in {leaked}"
