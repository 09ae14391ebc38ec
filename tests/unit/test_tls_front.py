"""attnserve-haproxy's rewrite of the configuration Ray renders, and the loopback binds of a local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnserve.service.private_binds import private_address
from attnserve.service.tls_front import rewrite

PEM, CA = Path("/run/x/server.pem"), Path("/run/x/ca.pem")


def _ray_config(folder: Path) -> str:
    """The configuration Ray 2.60 itself renders for a gRPC service on all interfaces."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions, gRPCOptions

    grpc = gRPCOptions(
        port=50051, grpc_servicer_functions=["attnserve.service.grpc_services.add_health_to_server"]
    )
    cfg = HAProxyConfig(http_options=HTTPOptions(host="0.0.0.0", port=8000), grpc_options=grpc,
                        socket_path=str(folder / "admin.sock"))  # fmt: skip
    HAProxyApi(cfg, config_file_path=str(folder / "haproxy.cfg"))._generate_config_file_internal()
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
