"""`attnserve bench --tls`: what TLS on the public gRPC port costs, against the same running service.

One local service (Ray, HAProxy through attnserve-haproxy, every model) serves TLS on its gRPC
port and, for this measurement only, the same HAProxy frontend in plaintext on a loopback twin
port: the two paths differ in TLS alone. Closed loops alternate between them (plaintext first in
even rounds, TLS first in odd ones) at each concurrency, and each path's calls are pooled over
the rounds, so drift on a shared machine hits both alike. Certificates are made for the run
(ECDSA P-256, as `attnserve certs` makes them); each path keeps one channel, so the TLS handshake
is paid once and the figures are the steady per-call cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc

from attnserve.bench.loadgen import Outcome, closed_loop, codes, percentiles_ms
from attnserve.bench.run import BenchConfig, grpc_call, jsonable, load_workloads, write_json
from attnserve.bench.servers import CpuMeter, free_port, ray_service
from attnserve.cli.certs import make_all
from attnserve.service.tls import CERT_ENV, KEY_ENV
from attnserve.service.tls_front import PLAINTEXT_TWIN_ENV

PATHS = ("plaintext", "tls")
DEFAULT_MODEL = "g2p-bahdanau"
ROUNDS = 3


@dataclass(frozen=True)
class TlsRow:
    """One path (plaintext or tls) of one model at one concurrency, pooled over the rounds."""

    path: str
    model: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_ms: float | None
    codes: dict[str, int]


def run_tls_bench(cfg: BenchConfig, rounds: int = ROUNDS) -> list[TlsRow]:
    """Measures plaintext and TLS side by side; prints a table and writes JSON to cfg.out.

    Args:
        cfg: models (default g2p-bahdanau), concurrencies, calls and seconds per closed loop.
        rounds: alternations of the two paths at each concurrency.

    Returns:
        One row per path, model and concurrency.
    """
    cfg = replace(cfg, models=cfg.models or (DEFAULT_MODEL,))
    workloads = load_workloads(cfg.repository, cfg.models, cfg.inputs, cfg.attention)
    with _secured_service(cfg) as (target, addresses):
        rows = asyncio.run(_measure_all(cfg, rounds, workloads, addresses, target.processes))
    print_tls_table(rows)
    write_json(cfg.out, {"config": jsonable(asdict(cfg)) | {"rounds": rounds},
                         "rows": [asdict(r) for r in rows], "overhead": overhead(rows)})  # fmt: skip
    return rows


@contextlib.contextmanager
def _secured_service(cfg: BenchConfig) -> Iterator:
    """The local service with TLS and its plaintext twin; yields (target, {path: (address, creds)})."""
    twin = free_port()
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="attnserve-tls-bench-") as folder:
        certs = Path(folder)
        make_all(certs)
        os.environ.update({CERT_ENV: str(certs / "server.crt"), KEY_ENV: str(certs / "server.key"),
                           PLAINTEXT_TWIN_ENV: str(twin)})  # fmt: skip
        try:
            with ray_service(cfg.repository, cfg.serve_config, ready_address=f"127.0.0.1:{twin}") as target:
                credentials = grpc.ssl_channel_credentials((certs / "ca.crt").read_bytes())
                yield target, {"plaintext": (f"127.0.0.1:{twin}", None), "tls": (target.address, credentials)}
        finally:
            os.environ.clear()
            os.environ.update(saved)


async def _measure_all(cfg: BenchConfig, rounds: int, workloads, addresses, processes) -> list[TlsRow]:
    """Alternating closed loops on both paths; the rows pooled per path, model and concurrency."""
    channels = {
        path: grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
        for path, (address, creds) in addresses.items()
    }
    pooled: dict[tuple[str, str, int], tuple[list[Outcome], float, float]] = {}
    try:
        for w in workloads:
            calls = {path: grpc_call([ch], w, cfg.timeout_s) for path, ch in channels.items()}
            for c in cfg.concurrency:
                for path in PATHS:  # warm both: connections, TLS session, replica
                    await closed_loop(calls[path], c, max(cfg.warmup, 2 * c))
                for r in range(rounds):
                    for path in PATHS if r % 2 == 0 else PATHS[::-1]:
                        meter = CpuMeter(processes())
                        outcomes, wall = await closed_loop(calls[path], c, cfg.requests, cfg.max_seconds)
                        cpu = sum(meter.read().server.values())
                        got, seconds, spent = pooled.get((path, w.model, c), ([], 0.0, 0.0))
                        pooled[(path, w.model, c)] = (got + outcomes, seconds + wall, spent + cpu)
                        print(f"  {path:<9} {w.model:<18} c={c:<3d} round {r + 1}: "
                              f"{len(outcomes) / wall:8.1f} req/s", flush=True)  # fmt: skip
    finally:
        for channel in channels.values():
            await channel.close()
    return [_row(key, *value) for key, value in pooled.items()]


def _row(key: tuple[str, str, int], outcomes: list[Outcome], wall: float, cpu_s: float) -> TlsRow:
    path, model, concurrency = key
    ok = [o.seconds for o in outcomes if o.code == "OK"]
    p50, p99 = percentiles_ms(ok, 50, 99)
    n = len(outcomes)
    return TlsRow(path, model, concurrency, n, round(wall, 2), round(len(ok) / wall, 1) if wall else 0.0,
                  p50, p99, round(1000 * cpu_s / n, 2) if n else None, codes(outcomes))  # fmt: skip


def overhead(rows: list[TlsRow]) -> list[dict]:
    """TLS against plaintext per model and concurrency: throughput lost (%) and p50 added (ms)."""
    by_key = {(r.path, r.model, r.concurrency): r for r in rows}
    out = []
    for r in rows:
        plain = by_key.get(("plaintext", r.model, r.concurrency))
        if r.path != "tls" or not plain or not plain.req_per_s:
            continue
        added = None if None in (r.p50_ms, plain.p50_ms) else round(r.p50_ms - plain.p50_ms, 2)
        out.append({"model": r.model, "concurrency": r.concurrency,
                    "throughput_loss_pct": round(100 * (1 - r.req_per_s / plain.req_per_s), 1),
                    "p50_added_ms": added})  # fmt: skip
    return out


def print_tls_table(rows: list[TlsRow]) -> None:
    """Plaintext and TLS side by side, with the overhead."""
    by_key = {(r.path, r.model, r.concurrency): r for r in rows}
    header = ("model", "conc", "plain req/s", "TLS req/s", "loss %", "plain p50", "TLS p50", "+p50 ms",
              "plain CPU", "TLS CPU")  # fmt: skip
    widths = (-18, 4, 11, 10, 7, 9, 8, 8, 9, 8)
    print("\n" + " ".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True))
          + "  errors")  # fmt: skip
    for o in overhead(rows):
        p, t = (
            by_key[("plaintext", o["model"], o["concurrency"])],
            by_key[("tls", o["model"], o["concurrency"])],
        )
        errors = {k: v for r in (p, t) for k, v in r.codes.items() if k != "OK"}
        print(f"{o['model']:<18} {o['concurrency']:>4} {p.req_per_s:>11.1f} {t.req_per_s:>10.1f} "
              f"{o['throughput_loss_pct']:>7.1f} {p.p50_ms:>9.2f} {t.p50_ms:>8.2f} {o['p50_added_ms']:>8.2f} "
              f"{p.server_cpu_ms:>9.2f} {t.server_cpu_ms:>8.2f}  {errors or ''}")  # fmt: skip
    print("CPU: server CPU ms per call (every process of the local Ray and its HAProxy)")
