"""`attnserve bench --burst`: N calls at once at concurrency C over K connections; how each is answered.

A burst is what admission control exists for: far more calls than the service can take, all at
the same moment. Each variant (one per connection count, by default 30 connections, then one)
warms the engine up, then keeps C calls in flight (each call's end starts the next) until N have
been sent, every call with a client deadline, spread round-robin over K grpc.aio channels (one
HTTP/2 connection each), all on one event loop of this process (the load generator shares the
machine's cores with the service).

Reports, per status code and per status message (so HAProxy's refusals are told from the
replica's, and a bare CANCELLED from a refusal), how many calls got it and how long they took to
be answered as this client saw it (p50, p99, max); the server's and the generator's CPU; and, for
a service started here, what HAProxy saw: its counters over the burst (calls at the replica and
queued at most, aborts by client and by server) and, from its access log, the time it took to
answer calls it answered itself and calls a replica answered. The client's figures include its
own event loop's delay (about 0.25 ms of Python per call in flight: at C=1500 a call answered at
once by the server can still read ~0.1-0.3 s here); HAProxy's are the server's.

Checks: only OK or RESOURCE_EXHAUSTED, and refusals p99 (client side) within REFUSAL_P99_TARGET_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from attnserve.bench.inputs import Workload, load_workload
from attnserve.bench.loadgen import Latency, loop_lag, percentiles_ms
from attnserve.bench.run import fmt, jsonable, write_json
from attnserve.bench.servers import CpuMeter, Target, ray_service
from attnserve.core.manifest import discover
from attnserve.service.client import TIMEOUT_METADATA
from attnserve.service.config import DEFAULT_SERVE_CONFIG, app_args
from attnserve.v1 import translator_pb2_grpc as pb_grpc

ALLOWED = ("OK", "RESOURCE_EXHAUSTED")  # what a burst's calls may get (their deadline is generous)
REFUSAL_P99_TARGET_MS = 1000.0  # before the fix: p99 1.6-2.2 s (FACTS.md "Bursts")
MESSAGES = 4  # most frequent status messages kept per code
# HAProxy counters read over a burst (show stat): cumulative ones as differences, maxima as read
# after `clear counters` at the start (smax: calls at a server at once; qmax: queued in HAProxy).
HAPROXY_COUNTERS = ("stot", "ereq", "econ", "eresp", "cli_abrt", "srv_abrt", "hrsp_2xx", "hrsp_5xx",
                    "wretr", "wredis", "dreq", "dresp")  # fmt: skip
HAPROXY_MAXIMA = ("smax", "qmax")
LOG_TARGET_ENV = "RAY_SERVE_HAPROXY_LOG_TARGET"
# One `option httplog` line of the gRPC frontend: backend/server, then Th/Ti/TR/Tw/Tc/Tr/Ta timers
# (HAProxy 2.8 logs TR/Tw/Tc/Tr/Ta), status and bytes.
_HTTPLOG = re.compile(r"\] grpc_frontend (\S+)/(\S+) (-?\d+)/(-?\d+)/(-?\d+)/(-?\d+)/(-?\d+) (\d+) ")


@dataclass(frozen=True)
class BurstConfig:
    """What to run.

    calls: calls per burst (N); concurrency: calls in flight at most (C), all sent at once first;
    connections: one burst per entry, over that many HTTP/2 connections (K);
    deadline_s: each call's client deadline (gRPC's, and the metadata the server reads).
    haproxy_socket: HAProxy's admin socket, for its counters (a service started here: its own).
    """

    model: str = "en-fr-transformer"
    repository: Path = Path("model_repository")
    serve_config: Path = DEFAULT_SERVE_CONFIG
    target: str | None = None
    calls: int = 3000
    concurrency: int = 1500
    connections: tuple[int, ...] = (30, 1)
    deadline_s: float = 10.0
    warmup_calls: int = 64
    settle_s: float = 3.0
    haproxy_socket: str | None = None
    out: Path = Path("bench/results/burst.json")


@dataclass(frozen=True)
class Timing(Latency):
    """How many calls, and how long they took to be answered (ms), the slowest too."""

    max_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        p50, p99 = percentiles_ms(seconds, 50, 99)
        return cls(len(seconds), p50, p99, round(1000 * max(seconds), 2) if seconds else None)


@dataclass(frozen=True)
class Answered(Timing):
    """Calls that ended with one status: all of them, and those of each frequent message."""

    messages: dict[str, Timing] = field(default_factory=dict)


@dataclass(frozen=True)
class BurstRun:
    """One burst over `connections` connections.

    haproxy: HAProxy's counters per gRPC frontend, backend and server (None without its socket);
    answered_by: from HAProxy's log, time to answer of the calls HAProxy answered itself
        ("haproxy") and of those a replica answered ("replica"), as HAProxy timed them.
    """

    connections: int
    calls: int
    concurrency: int
    wall_s: float
    codes: dict[str, Answered]
    ok_per_s: float
    server_cpu_cores: float | None
    client_cpu_cores: float
    other_cores: float
    client_loop_lag_p99_ms: float | None
    haproxy: dict[str, dict[str, int]] | None
    answered_by: dict[str, Timing] | None
    checks: dict[str, bool]


@dataclass(frozen=True)
class Call:
    """One call of a burst: seconds from sending to its answer, status code and message."""

    seconds: float
    code: str
    message: str


class HaproxyLog:
    """HAProxy's access log (syslog over UDP) of a service this process starts: a socket on
    loopback that Ray's HAProxy is told to log to ($RAY_SERVE_HAPROXY_LOG_TARGET, read when Ray
    starts), drained by a thread."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # a burst's lines
        self.socket.bind(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self._lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._drain, name="haproxy-log", daemon=True).start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                line = self.socket.recv(65536).decode(errors="replace")
                with self._lock:
                    self._lines.append(line)

    def take(self) -> list[str]:
        """The lines received since the last take."""
        with self._lock:
            lines, self._lines = self._lines, []
        return lines

    def close(self) -> None:
        self.socket.close()


def answered_by(lines: list[str]) -> dict[str, Timing]:
    """Time to answer (HAProxy's Ta) of gRPC calls HAProxy answered itself (no server: a refusal)
    and of those a replica answered, from HAProxy access log lines."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for line in lines:
        m = _HTTPLOG.search(line)
        if m and int(m.group(7)) >= 0:
            seconds["haproxy" if m.group(2) == "<NOSRV>" else "replica"].append(int(m.group(7)) / 1000)
    return {who: Timing.of(s) for who, s in sorted(seconds.items())}


def run_burst(cfg: BurstConfig) -> list[BurstRun]:
    """Runs one burst per connection count against a new Ray service (or cfg.target); prints and
    writes JSON.

    Returns:
        The runs, in cfg.connections order.
    """
    manifest = next((m for m in discover(cfg.repository) if m.name == cfg.model), None)
    if manifest is None:
        raise ValueError(f"model {cfg.model!r} is not in {cfg.repository}")
    workload = load_workload(manifest)
    max_wait = app_args(cfg.serve_config, cfg.repository).serving.for_model(cfg.model).max_queue_wait_s
    with _service(cfg) as (target, log):
        socket_path = cfg.haproxy_socket or (None if cfg.target else own_haproxy_socket())
        runs = []
        for k in cfg.connections:
            runs.append(asyncio.run(_burst(cfg, target, workload, k, socket_path, log)))
            print_run(runs[-1])
            time.sleep(cfg.settle_s)  # the accepted calls of one burst are long answered by now
        settings = _haproxy_settings(socket_path)
    write_json(cfg.out, {"config": jsonable(asdict(cfg)), "max_queue_wait_s": max_wait,
                         "haproxy_settings": settings, "runs": [asdict(r) for r in runs]})  # fmt: skip
    return runs


@contextlib.contextmanager
def _service(cfg: BurstConfig) -> Iterator[tuple[Target, HaproxyLog | None]]:
    """cfg.target, or a new Ray service (its HAProxy logging to this process) stopped afterwards."""
    if cfg.target:
        yield Target("ray", cfg.target), None
        return
    print("starting attnserve (local Ray) ...", flush=True)
    log = None if os.environ.get(LOG_TARGET_ENV) else HaproxyLog()
    if log:
        os.environ[LOG_TARGET_ENV] = log.target
    try:
        with ray_service(cfg.repository, cfg.serve_config) as target:
            yield target, log
    finally:
        if log:
            log.close()
            del os.environ[LOG_TARGET_ENV]


def own_haproxy_socket() -> str | None:
    """The admin socket of the HAProxy of a local service this process started (Ray puts its
    files in a folder per node under the configured one), or None."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH")
    if not configured:
        return None
    path = Path(configured)
    found = [path] if path.exists() else sorted(path.parent.glob(f"*/{path.name}"))
    return str(found[0]) if found else None


def caller(channels: list[grpc.aio.Channel], workload: Workload, deadline_s: float):
    """An async function: input index -> Call, round-robin over the channels; never raises."""
    stubs = [getattr(pb_grpc.TranslatorStub(c), workload.rpc) for c in channels]
    requests, metadata = workload.requests, ((TIMEOUT_METADATA, str(int(deadline_s * 1000))),)

    async def call(i: int) -> Call:
        sent = time.perf_counter()
        try:
            await stubs[i % len(stubs)](requests[i % len(requests)], timeout=deadline_s, metadata=metadata)
            code, message = "OK", ""
        except grpc.aio.AioRpcError as e:
            code, message = e.code().name, e.details() or ""
        return Call(time.perf_counter() - sent, code, message)

    return call


async def fire(call, calls: int, concurrency: int) -> list[Call]:
    """`concurrency` calls at once, each one's end starting the next, until `calls` were sent."""
    indices = iter(range(calls))
    answered: list[Call] = []

    async def lane() -> None:
        for i in indices:
            answered.append(await call(i))

    await asyncio.gather(*(lane() for _ in range(min(concurrency, calls))))
    return answered


async def burst(target: str, workload: Workload, calls: int, concurrency: int, connections: int,
                deadline_s: float, warmup_calls: int = 64) -> list[Call]:  # fmt: skip
    """Warm-up (the engine measures its decode time), then one burst; every call's answer."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own for each channel
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        call = caller(channels, workload, deadline_s)
        await fire(call, max(warmup_calls, connections), 16)
        return await fire(call, calls, concurrency)
    finally:
        for channel in channels:
            await channel.close()


async def _burst(cfg: BurstConfig, target: Target, workload: Workload, connections: int,
                 socket_path: str | None, log: HaproxyLog | None) -> BurstRun:  # fmt: skip
    """Warm-up, then one burst over `connections` connections, measured."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target.address, options=options) for _ in range(connections)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        call = caller(channels, workload, cfg.deadline_s)
        warm = await fire(call, max(cfg.warmup_calls, connections), 16)  # the engine measures decode time
        if any(c.code != "OK" for c in warm):
            print(f"warning: warm-up answers {dict(Counter(c.code for c in warm))}", flush=True)
        print(f"burst: {cfg.calls} calls at concurrency {cfg.concurrency} over {connections} "
              f"connection(s) ...", flush=True)  # fmt: skip
        await asyncio.sleep(0.5)  # the warm-up's log lines arrive
        if log:
            log.take()
        before = _haproxy_stats(socket_path, clear=True)
        meter, stop = CpuMeter(target.processes()), asyncio.Event()
        lags = asyncio.ensure_future(loop_lag(stop))
        started = time.perf_counter()
        answered = await fire(call, cfg.calls, cfg.concurrency)
        wall = time.perf_counter() - started
        stop.set()
        spent = meter.read()
        after = _haproxy_stats(socket_path)
        await asyncio.sleep(0.5)  # the burst's last log lines arrive
    finally:
        for channel in channels:
            await channel.close()
    by_code = summarise(answered)
    ok = by_code.get("OK")
    return BurstRun(
        connections=connections,
        calls=cfg.calls,
        concurrency=cfg.concurrency,
        wall_s=round(wall, 2),
        codes=by_code,
        ok_per_s=round(ok.count / wall, 1) if ok and wall else 0.0,
        server_cpu_cores=round(sum(spent.server.values()) / wall, 2) if meter.servers else None,
        client_cpu_cores=round(spent.client / wall, 2),
        other_cores=round(max(spent.other, 0.0) / wall, 2),
        client_loop_lag_p99_ms=percentiles_ms(list(await lags), 99)[0],
        haproxy=_haproxy_delta(before, after),
        answered_by=answered_by(log.take()) if log else None,
        checks=checks(by_code),
    )


def summarise(answered: list[Call]) -> dict[str, Answered]:
    """Count and time to answer per status code (most frequent first), and per frequent message."""
    out = {}
    for code, _ in Counter(c.code for c in answered).most_common():
        mine = [c for c in answered if c.code == code]
        whole = Timing.of([c.seconds for c in mine])
        top = Counter(c.message for c in mine).most_common(MESSAGES)
        messages = {text: Timing.of([c.seconds for c in mine if c.message == text]) for text, _ in top}
        out[code] = Answered(whole.count, whole.p50_ms, whole.p99_ms, whole.max_ms, messages)
    return out


def checks(by_code: dict[str, Answered]) -> dict[str, bool]:
    """The burst's targets, each passed or not."""
    refused = by_code.get("RESOURCE_EXHAUSTED")
    return {
        "no status but " + ", ".join(ALLOWED): set(by_code) <= set(ALLOWED),
        f"refusals p99 <= {REFUSAL_P99_TARGET_MS:g} ms": refused is None
        or (refused.p99_ms or 0.0) <= REFUSAL_P99_TARGET_MS,
    }


def _admin(socket_path: str, command: str) -> str:
    """One command on HAProxy's admin socket."""
    from attnserve.service.tls_front import admin_command

    return admin_command(socket_path, command + "\n")


def _haproxy_stats(socket_path: str | None, clear: bool = False) -> dict[str, dict[str, str]] | None:
    """`show stat` of the gRPC frontend, backends and servers (None without a socket); with
    clear, the maxima are reset first."""
    if not socket_path or not Path(socket_path).exists():
        return None
    try:
        if clear:
            _admin(socket_path, "clear counters")
        text = _admin(socket_path, "show stat").lstrip("# ")
    except OSError:
        return None
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row["pxname"].startswith("grpc"):
            rows[f"{row['pxname']}/{row['svname']}"] = row
    return rows


def _haproxy_delta(before, after) -> dict[str, dict[str, int]] | None:
    """HAProxy's counters over the burst, per gRPC frontend, backend and server."""
    if not before or not after:
        return None

    def number(value: str | None) -> int:
        return int(value) if value and value.lstrip("-").isdigit() else 0

    out = {}
    for name, row in after.items():
        was = before.get(name, {})
        figures = {k: number(row.get(k)) - number(was.get(k)) for k in HAPROXY_COUNTERS}
        figures.update({k: number(row.get(k)) for k in HAPROXY_MAXIMA})
        if any(figures.values()):
            out[name] = figures
    return out


def _haproxy_settings(socket_path: str | None) -> dict | None:
    """The limits of the HAProxy that served the bursts: its configuration's relevant lines."""
    if not socket_path:
        return None
    folder = Path(socket_path).parent
    configs = sorted(folder.glob("*.attnserve.cfg")) or sorted(folder.glob("*.cfg"))
    if not configs:
        return None
    wanted = ("maxconn", "max-concurrent-streams", "timeout", "server ", "be_conn_free")
    lines = [line.strip() for line in configs[-1].read_text().splitlines()]
    return {"file": str(configs[-1]), "lines": [x for x in lines if any(w in x for w in wanted)]}


def print_run(r: BurstRun) -> None:
    """One burst as a small table."""
    print(f"\nburst over {r.connections} connection(s): {r.calls} calls at concurrency {r.concurrency} "
          f"in {r.wall_s} s ({r.ok_per_s} OK/s)")  # fmt: skip
    header = f"{'status (client side)':<22} {'calls':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}  message"
    print(header + "\n" + "-" * len(header))
    for code, a in r.codes.items():
        if len(a.messages) <= 1:
            rows = [(code, a, next(iter(a.messages), ""))]
        else:
            rows = [(code, a, "(all)"), *(("", t, text) for text, t in a.messages.items())]
        for name, t, text in rows:
            figures = " ".join(f"{fmt(v):>9}" for v in (t.p50_ms, t.p99_ms, t.max_ms))
            print(f"{name:<22} {t.count:>6} {figures}  {text[:64]}")
    for who, t in (r.answered_by or {}).items():
        figures = " ".join(f"{fmt(v):>9}" for v in (t.p50_ms, t.p99_ms, t.max_ms))
        print(f"{'answered by ' + who:<22} {t.count:>6} {figures}  (HAProxy's timing)")
    print(f"CPU cores busy: server {fmt(r.server_cpu_cores)}, load generator {r.client_cpu_cores}, "
          f"anything else {r.other_cores}; generator's loop late by {fmt(r.client_loop_lag_p99_ms)} ms "
          "at p99")  # fmt: skip
    for name, figures in (r.haproxy or {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if v)
        print(f"  haproxy {name}: {shown}")
    for name, passed in r.checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
