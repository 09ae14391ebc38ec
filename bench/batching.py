"""Step-level vs request-level batching on the same engine, under open-loop Poisson load.

For each model: the engine's capacity is measured first (request-level, everything queued at
once), then requests of real, mixed-length test inputs arrive as a Poisson process at fractions
of that capacity, once with step-level batching and once without (`EngineConfig.step_batching`),
in-process so only the batching policy differs. Per rate and mode: throughput, p50/p99 latency
and p50/p99 time to the first token. Then a short request is sent while 16 long ones decode,
and the steps and milliseconds it takes are reported.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from attnserve.bench.inputs import load_workload, prepare
from attnserve.bench.loadgen import poisson_arrivals
from attnserve.core.engine import Engine, EngineConfig
from attnserve.core.manifest import discover
from attnserve.core.model_runner import ModelRunner
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.service.config import app_args

MODES = {"step": True, "request": False}


@dataclass(frozen=True)
class BatchingConfig:
    """What to measure."""

    models: tuple[str, ...] = ("en-fr-transformer", "g2p-bahdanau", "dates-luong")
    repository: Path = Path("model_repository")
    loads: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1)  # arrival rate / measured capacity
    seconds: float = 8.0  # of arrivals per rate and mode
    serve_config: Path = Path("deploy/serve/attnserve.yaml")  # each model's max_batch_size
    intra_op_threads: int = 1  # as served (deploy/serve/attnserve.yaml)
    precision: str = "auto"  # as served
    out: Path = Path("bench/results/batching.json")


@dataclass(frozen=True)
class LoadRow:
    """One model, batching mode and arrival rate."""

    model: str
    mode: str
    load: float
    rate: float
    sent: int
    throughput: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float


class _Steps:
    """An engine observer that counts decoder steps."""

    def __init__(self):
        self.count = 0

    def step(self, rows, waits, seconds, output_tokens) -> None:
        self.count += 1

    def rejected(self, reason) -> None:
        pass

    def dropped(self, reason) -> None:
        pass

    def queue_depth(self, queued) -> None:
        pass


def _engine(runner: ModelRunner, cfg: BatchingConfig, step: bool, observer=None) -> Engine:
    """An engine with the model's served batch size and admission off (max_queue_wait_s huge),
    so queueing shows in latency."""
    config = EngineConfig(max_batch_size=_served_batch_size(cfg.serve_config, runner.manifest.name),
                          max_queue_wait_s=1e9, max_queued=1 << 20, step_batching=step)  # fmt: skip
    return Engine(runner, config, observer)


@cache
def _served_batch_size(serve_config: Path, model: str) -> int:
    """The model's max_batch_size in the serve config's first application (read once)."""
    return app_args(serve_config).serving.for_model(model).max_batch_size


def capacity(runner: ModelRunner, requests: list, cfg: BatchingConfig) -> float:
    """Requests/s with request-level batching and everything queued at once."""
    engine = _engine(runner, cfg, step=False)
    started = time.perf_counter()
    futures = [engine.submit(r) for r in requests]
    for f in futures:
        f.result()
    engine.close()
    return len(requests) / (time.perf_counter() - started)


def run_load(runner: ModelRunner, requests: list, cfg: BatchingConfig, rate_capacity: float) -> list[LoadRow]:
    """Every mode at every load factor."""
    rows = []
    for load in cfg.loads:
        rate = load * rate_capacity
        for mode, step in MODES.items():
            latencies, ttft, wall = open_loop(runner, requests, cfg, step, rate, seed=int(load * 100))
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            f50, f99 = np.percentile(ttft, [50, 99]) * 1000
            row = LoadRow(runner.manifest.name, mode, load, rate, len(latencies), len(latencies) / wall,
                          float(p50), float(p99), float(f50), float(f99))  # fmt: skip
            rows.append(row)
            print(_format(row), flush=True)
    return rows


def open_loop(runner: ModelRunner, requests: list, cfg: BatchingConfig, step: bool, rate: float, seed: int):
    """Poisson arrivals at `rate` for cfg.seconds: (latencies, times to first token, wall seconds)."""
    engine = _engine(runner, cfg, step)
    arrivals = poisson_arrivals(rate, cfg.seconds, seed)
    first: dict[int, float] = {}
    sent = []

    def stamp(future) -> None:
        future.finished_at = time.perf_counter()

    start = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        future = engine.submit(
            requests[i % len(requests)],
            on_token=lambda token, i=i: first.setdefault(i, time.perf_counter()),
        )
        future.add_done_callback(stamp)
        sent.append((t0, future))
    for _, future in sent:
        future.result()
    wall = max(f.finished_at for _, f in sent) - start
    engine.close()
    latencies = [f.finished_at - t0 for t0, f in sent]
    ttft = [first.get(i, f.finished_at) - t0 for i, (t0, f) in enumerate(sent)]
    return latencies, ttft, wall


def short_among_long(runner: ModelRunner, long_requests: list, short_request, cfg: BatchingConfig) -> dict:
    """A short request sent while 16 long ones decode: its latency and the steps it waited, per mode."""
    out = {}
    for mode, step in MODES.items():
        steps = _Steps()
        engine = _engine(runner, cfg, step, steps)
        long = [engine.submit(r) for r in long_requests[:16]]
        while steps.count < 3:
            time.sleep(0.0005)
        before = steps.count
        t0 = time.perf_counter()
        engine.submit(short_request).result()
        out[mode] = {"ms": (time.perf_counter() - t0) * 1000, "steps": steps.count - before}
        for f in long:
            f.result()
        engine.close()
    return out


def _format(row: LoadRow) -> str:
    return (
        f"{row.model:18} {row.mode:7} load {row.load:4.2f} ({row.rate:6.1f}/s): {row.throughput:6.1f} req/s, "
        f"p50 {row.p50_ms:7.1f} ms, p99 {row.p99_ms:7.1f} ms, first token p50 {row.ttft_p50_ms:6.1f} / "
        f"p99 {row.ttft_p99_ms:6.1f} ms"
    )


def sustainable(rows: list[LoadRow], mode: str, p99_ms: float = 1000.0) -> float:
    """The highest measured throughput of a mode whose p99 stays within p99_ms."""
    ok = [r.throughput for r in rows if r.mode == mode and r.p99_ms <= p99_ms]
    return max(ok, default=0.0)


def run_batching(cfg: BatchingConfig) -> dict:
    """Measures every model; prints a table and writes JSON."""
    manifests = {m.name: m for m in discover(cfg.repository)}
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "models": {},
    }
    for name in cfg.models:
        runner = ModelRunner(
            manifests[name], RuntimeConfig(intra_op_threads=cfg.intra_op_threads, precision=cfg.precision)
        )
        workload = load_workload(runner.manifest, count=400)
        requests = [prepare(runner.codec, s) for s in workload.samples]
        rate = capacity(runner, requests, cfg)
        print(f"{name}: capacity {rate:.1f} req/s (request-level, all queued)", flush=True)
        rows = run_load(runner, requests, cfg, rate)
        by_length = sorted(requests, key=lambda r: len(r.source_ids))
        short = by_length[0]
        long = [r for r in by_length[::-1]][:16]
        mixed = short_among_long(runner, long, short, cfg)
        print(f"{name}: a short request among 16 long ones: {mixed}", flush=True)
        report["models"][name] = {
            "capacity": rate,
            "rows": [asdict(r) for r in rows],
            "sustainable_p99_1s": {m: sustainable(rows, m) for m in MODES},
            "short_among_long": mixed,
        }
    _print_table(report)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {cfg.out}")
    return report


def _print_table(report: dict) -> None:
    """Markdown table: per model and load, step vs request p99 and throughput."""
    print("\n| model | load | rate/s | step req/s | step p50/p99 ms | step TTFT p50 ms | "
          "request req/s | request p50/p99 ms | request TTFT p50 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in report["models"].items():
        rows = {(r["mode"], r["load"]): r for r in m["rows"]}
        for load in sorted({r["load"] for r in m["rows"]}):
            s, q = rows[("step", load)], rows[("request", load)]
            print(f"| {name} | {load:.2f} | {s['rate']:.0f} | {s['throughput']:.0f} | "
                  f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} | {s['ttft_p50_ms']:.1f} | {q['throughput']:.0f} | "
                  f"{q['p50_ms']:.0f} / {q['p99_ms']:.0f} | {q['ttft_p50_ms']:.1f} |")  # fmt: skip
        sus = m["sustainable_p99_1s"]
        print(f"| {name} | sustainable at p99 ≤ 1 s | | {sus['step']:.0f} | | | {sus['request']:.0f} | | |")
