"""The plain grpc.aio server secured over a real socket: mutual TLS, tokens, renewed certificates."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import grpc
import pytest

from attnserve.bench.plain_server import serve_plain
from attnserve.cli.certs import issue
from attnserve.core.engine import Engine, EngineConfig
from attnserve.core.model_runner import ModelRunner
from attnserve.service.auth import TokenStore
from attnserve.service.client import Client
from attnserve.service.tls import ClientTls, ServerTls
from tests.integration.conftest import free_port

MODEL, TOKEN = "g2p-bahdanau", "plain-3f9a1c7e5b2d8064"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("plain-pki")
    ca, renewed = issue("plain CA"), issue("renewed CA")
    files = {"ca": ca, "renewed-ca": renewed, "server": issue("localhost", ca, ("127.0.0.1",)),
             "renewed-server": issue("localhost", renewed, ("127.0.0.1",)),
             "client": issue("client", ca, client=True)}  # fmt: skip
    paths = {}
    for stem, issued in files.items():
        paths[stem], paths[f"{stem}-key"] = folder / f"{stem}.crt", folder / f"{stem}.key"
        paths[stem].write_bytes(issued.cert)
        paths[f"{stem}-key"].write_bytes(issued.key)
    paths["tokens"] = folder / "tokens"
    paths["tokens"].write_text(f"tester:{TOKEN}\n")
    return paths


@pytest.fixture(scope="module")
def address(pki, bundled_manifest):
    """The plain server with mutual TLS and tokens, on its own event loop thread."""
    engine = Engine(ModelRunner(bundled_manifest), EngineConfig(max_batch_size=8))
    address, loop, stop = f"127.0.0.1:{free_port()}", asyncio.new_event_loop(), None
    tls = ServerTls(pki["server"], pki["server-key"], pki["ca"])

    async def run():
        nonlocal stop
        stop = asyncio.Event()
        await serve_plain({MODEL: engine}, address, stop, tls, TokenStore(pki["tokens"]))

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    yield address
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    engine.close()


def _client(address: str, pki, ca: str = "ca", cert: bool = True, token: str | None = TOKEN) -> Client:
    tls = ClientTls(pki[ca], pki["client"] if cert else None, pki["client-key"] if cert else None)
    return Client(address, timeout_s=5, tls=tls, token=token)


def _code(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def test_mutual_tls_with_a_token_is_served(address, pki):
    with _client(address, pki) as client:
        assert client.translate(MODEL, "plain").text


def test_no_token_plaintext_or_no_client_certificate_is_refused(address, pki):
    with _client(address, pki, token=None) as client:
        assert _code(lambda: client.translate(MODEL, "plain")) == "UNAUTHENTICATED"
    with Client(address, timeout_s=5, token=TOKEN) as plaintext:
        assert _code(plaintext.list_models) == "UNAVAILABLE"
    with _client(address, pki, cert=False) as anonymous:
        assert _code(anonymous.list_models) == "UNAVAILABLE"


def test_a_renewed_certificate_serves_new_connections_without_a_restart(address, pki):
    for stem in ("server-key", "server"):
        tmp = pki[stem].with_name("renewing")
        tmp.write_bytes(pki[f"renewed-{stem}"].read_bytes())
        os.replace(tmp, pki[stem])
    with _client(address, pki, ca="renewed-ca") as client:
        assert _code(client.list_models) == "OK"
    with _client(address, pki) as client:
        assert _code(client.list_models) == "UNAVAILABLE"
