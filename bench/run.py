"""`attnserve bench`: closed-loop gRPC load at several concurrencies vs the in-process engine.

Both sides decode the same real test words with the same batching settings; the in-process run
has no RPC, no Ray and no proxy, so it is the engine's own ceiling on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from attnserve.bench.microbatch import MicroBatcher
from attnserve.models.g2p_data import load_split
from attnserve.service.config import BatchingConfig, LocalOptions
from attnserve.service.core.manifest import discover
from attnserve.service.core.translation import AttentionMode, Translator
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    model: str = "g2p-bahdanau"
    repository: Path = Path("model_repository")
    target: str | None = None  # a running service; None starts one here
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 1000
    warmup: int = 32
    out: Path = Path("bench/results/bench.json")
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    attention: bool = True


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    mode: str
    concurrency: int
    requests: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    cpu_ms_per_req: float | None  # server-side CPU (all Ray processes for grpc); None if not measurable


async def _closed_loop(call: Callable[[str], Awaitable[int]], words: list[str], concurrency: int, total: int):
    """`concurrency` workers send requests back to back until `total` are done.

    Returns:
        (latencies in seconds, batch sizes, wall seconds).
    """
    latencies, batches, counter = [], [], iter(range(total))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            batches.append(await call(words[i % len(words)]))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, batches, time.perf_counter() - started


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU time of the processes still alive."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def _measure(mode, call, words, cfg: BenchConfig, server_processes) -> list[Row]:
    """Warm-up, then a timed closed loop per concurrency level."""
    rows = []
    for c in cfg.concurrency:
        await _closed_loop(call, words, c, cfg.warmup)
        processes = server_processes()
        cpu_before = _cpu_seconds(processes)
        latencies, batches, wall = await _closed_loop(call, words, c, cfg.requests)
        cpu = (_cpu_seconds(processes) - cpu_before) if processes else None
        ms = np.asarray(latencies) * 1000
        rows.append(Row(
            mode, c, len(latencies), round(len(latencies) / wall, 1),
            round(float(np.percentile(ms, 50)), 2), round(float(np.percentile(ms, 99)), 2),
            round(float(np.mean(batches)), 2), round(1000 * cpu / len(latencies), 2) if cpu else None,
        ))  # fmt: skip
        print(f"  {mode:10s} c={c:<3d} {rows[-1].req_per_s:8.1f} req/s", flush=True)
    return rows


async def _in_process(cfg: BenchConfig, words: list[str]) -> list[Row]:
    manifest = next(m for m in discover(cfg.repository) if m.name == cfg.model)
    translator = Translator(manifest)
    batcher = MicroBatcher(translator.translate_batch, cfg.batching.max_batch_size,
                           cfg.batching.batch_wait_timeout_s)  # fmt: skip
    mode = AttentionMode.CROSS if cfg.attention else AttentionMode.NONE

    async def call(word: str) -> int:
        return (await batcher.submit(translator.codec.prepare(word, mode))).batch_size

    try:
        return await _measure("in-process", call, words, cfg, lambda: [psutil.Process()])
    finally:
        await batcher.close()


async def _grpc(cfg: BenchConfig, target: str, words: list[str], server_processes) -> list[Row]:
    mode = pb.ATTENTION_MODE_CROSS if cfg.attention else pb.ATTENTION_MODE_NONE
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TranslatorStub(channel)

        async def call(word: str) -> int:
            options = pb.TranslateOptions(attention=mode)
            request = pb.TranslateRequest(model=cfg.model, text=word, options=options)
            return (await stub.Translate(request, timeout=60)).batch_size

        return await _measure("grpc", call, words, cfg, server_processes)


def _ray_processes() -> list[psutil.Process]:
    """The local Ray started by this process: GCS, raylet, proxy and replica workers."""
    return psutil.Process().children(recursive=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(cfg: BenchConfig) -> list[Row]:
    """Runs both modes, prints a table and writes JSON to cfg.out; returns the rows."""
    words = [e.word for e in load_split("test")]
    print(f"in-process engine ({cfg.model}, batching {cfg.batching}) ...", flush=True)
    rows = asyncio.run(_in_process(cfg, words))
    if cfg.target:
        rows += asyncio.run(_grpc(cfg, cfg.target, words, list))  # a remote server's CPU is not ours to see
    else:
        from attnserve.service import server

        options = LocalOptions(
            model_repository=cfg.repository, **cfg.batching.model_dump(),
            grpc_port=_free_port(), http_port=_free_port(), metrics_port=_free_port(),
        )  # fmt: skip
        print("starting attnserve (local Ray) for the gRPC runs ...", flush=True)
        endpoints = server.start(options)
        try:
            rows += asyncio.run(_grpc(cfg, endpoints.grpc, words, _ray_processes))
        finally:
            server.stop(endpoints)
    _report(cfg, rows)
    return rows


def _report(cfg: BenchConfig, rows: list[Row]) -> None:
    header = (
        f"{'mode':<11} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'mean batch':>10} {'CPU ms/req':>10}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in sorted(rows, key=lambda r: (r.concurrency, r.mode)):
        cpu = "-" if r.cpu_ms_per_req is None else f"{r.cpu_ms_per_req:.2f}"
        print(f"{r.mode:<11} {r.concurrency:>4} {r.req_per_s:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
              f"{r.mean_batch:>10.2f} {cpu:>10}")  # fmt: skip
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    config = {**asdict(cfg), "repository": str(cfg.repository), "out": str(cfg.out),
              "batching": cfg.batching.model_dump()}  # fmt: skip
    cfg.out.write_text(json.dumps({"machine": machine, "config": config, "rows": [asdict(r) for r in rows]},
                                  indent=2) + "\n")  # fmt: skip
    print(f"\nwrote {cfg.out}")
