"""`attnserve bench`: every model, closed loop at several concurrencies, on three serving paths.

- `ray`: the real service (Ray Serve, HAProxy direct ingress, one deployment holding every model);
- `plain`: a plain grpc.aio server over the same engines and servicer, in a process of its own
  (the Python serving ceiling);
- `in-process`: the engine called from the load generator's event loop, no RPC.

All three use the serve config's engine settings and real held-out inputs (bench/inputs.py),
with cross attention on. One server runs at a time; the load generator shares the machine.
Server CPU is the CPU time of the server's processes (for ray, every process of the local Ray
and its HAProxy; for in-process, this process, load generator included).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from attnserve.bench.inputs import DEFAULT_COUNT, Workload, load_workload, prepare
from attnserve.bench.loadgen import Call, closed_loop, codes, percentiles_ms
from attnserve.bench.servers import CpuMeter, CpuSpent, Target, plain_service, ray_service
from attnserve.core.engine import Engine
from attnserve.core.errors import RequestError
from attnserve.core.manifest import discover
from attnserve.service.client import TIMEOUT_METADATA
from attnserve.service.config import DEFAULT_SERVE_CONFIG
from attnserve.v1 import translator_pb2_grpc as pb_grpc

KINDS = ("ray", "plain", "in-process")
BUSY_ELSEWHERE = 0.2  # cores busy with other work during a row that make its figures suspect


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    models: model names; empty for every model in the repository.
    kinds: serving paths to measure (KINDS); with `target`, "ray" measures that service instead.
    requests: calls per model and concurrency at most; max_seconds caps each such run.
    """

    models: tuple[str, ...] = ()
    kinds: tuple[str, ...] = KINDS
    repository: Path = Path("model_repository")
    serve_config: Path = DEFAULT_SERVE_CONFIG
    target: str | None = None
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 1000
    max_seconds: float = 6.0
    warmup: int = 32
    inputs: int = DEFAULT_COUNT
    timeout_s: float = 60.0
    attention: bool = True
    out: Path = Path("bench/results/bench.json")


@dataclass(frozen=True)
class Row:
    """One serving path, model and concurrency, measured.

    server_cpu_ms: CPU ms per call of the server's processes (None when not measurable);
    client_cpu_ms: of this process (the load generator; for in-process it is the server too).
    other_cores: CPU cores busy meanwhile with anything else on this machine (should be ~0).
    cpu_by_process: server CPU ms per call by process role (replica, haproxy, raylet, ...).
    """

    kind: str
    model: str
    concurrency: int
    requests: int
    seconds: float
    req_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    mean_batch: float | None
    server_cpu_ms: float | None
    client_cpu_ms: float | None
    other_cores: float | None
    codes: dict[str, int] = field(default_factory=dict)
    cpu_by_process: dict[str, float] = field(default_factory=dict)


def run_bench(cfg: BenchConfig) -> list[Row]:
    """Measures every kind, model and concurrency; prints a table and writes JSON to cfg.out.

    Args:
        cfg: what to measure.

    Returns:
        The rows, in the order measured.
    """
    workloads = load_workloads(cfg.repository, cfg.models, cfg.inputs, cfg.attention)
    names = [w.model for w in workloads]
    rows: list[Row] = []
    for kind in cfg.kinds:
        print(f"{kind}: {', '.join(names)} ...", flush=True)
        if kind == "in-process":
            rows += asyncio.run(_in_process(cfg, workloads))
        else:
            with _server(cfg, kind) as target:
                rows += asyncio.run(_over_grpc(cfg, target, workloads))
    print_table(rows)
    write_json(cfg.out, {"config": jsonable(asdict(cfg)), "rows": [asdict(r) for r in rows],
                         "ratios": ratios(rows)})  # fmt: skip
    return rows


def load_workloads(repository: Path, models: tuple[str, ...], count: int, attention: bool) -> list[Workload]:
    """Test inputs of the named models (all when empty), in repository order.

    Raises:
        ValueError: for a name not in the repository.
    """
    manifests = {m.name: m for m in discover(repository)}
    unknown = sorted(set(models) - set(manifests))
    if unknown:
        raise ValueError(f"models {unknown} are not in {repository}; it has {sorted(manifests)}")
    chosen = [m for name, m in manifests.items() if not models or name in models]
    return [load_workload(m, count, attention) for m in chosen]


@contextlib.contextmanager
def _server(cfg: BenchConfig, kind: str) -> Iterator[Target]:
    """The server of one kind: a running target, or a new Ray service or plain server holding every
    model of the repository, as a replica does."""
    if kind == "ray" and cfg.target:
        yield Target("ray", cfg.target)  # a remote server's CPU is not ours to see
    elif kind == "ray":
        with ray_service(cfg.repository, cfg.serve_config) as target:
            yield target
    elif kind == "plain":
        with plain_service(cfg.repository, cfg.serve_config) as target:
            yield target
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


async def _over_grpc(cfg: BenchConfig, target: Target, workloads: list[Workload]) -> list[Row]:
    """Every model over one gRPC channel to the target."""
    rows = []
    async with grpc.aio.insecure_channel(target.address) as channel:
        for w in workloads:
            call = grpc_call([channel], w, cfg.timeout_s)
            rows += await _measure(cfg, target.kind, w.model, call, target.processes)
    return rows


async def _in_process(cfg: BenchConfig, workloads: list[Workload]) -> list[Row]:
    """Every model's engine called from this event loop."""
    from attnserve.bench.plain_server import engines_for

    engines = engines_for(cfg.serve_config, cfg.repository, [w.model for w in workloads])
    try:
        rows = []
        for w in workloads:
            call = engine_call(engines[w.model], w, cfg.attention)
            rows += await _measure(cfg, "in-process", w.model, call, None)
        return rows
    finally:
        for engine in engines.values():
            engine.close(timeout_s=2)


def grpc_call(channels: list[grpc.aio.Channel], workload: Workload, timeout_s: float) -> Call:
    """A Call sending the workload's prebuilt requests round-robin over the channels.

    Args:
        channels: open grpc.aio channels to one server.
        workload: the model's requests.
        timeout_s: each call's deadline, sent as gRPC's deadline and as the metadata Ray reads.

    Returns:
        The Call: input index -> (status code name, batch size).
    """
    stubs = [getattr(pb_grpc.TranslatorStub(c), workload.rpc) for c in channels]
    requests, metadata = workload.requests, ((TIMEOUT_METADATA, str(int(timeout_s * 1000))),)

    async def call(i: int) -> tuple[str, int]:
        try:
            response = await stubs[i % len(stubs)](requests[i % len(requests)], timeout=timeout_s,
                                                   metadata=metadata)  # fmt: skip
        except grpc.aio.AioRpcError as e:
            return e.code().name, 0
        return "OK", response.batch_size

    return call


def engine_call(engine: Engine, workload: Workload, attention: bool = True) -> Call:
    """A Call validating a sample as the servicer does and awaiting the engine's future.

    Args:
        engine: the model's engine (in this process).
        workload: the model's samples.
        attention: ask for cross attention.

    Returns:
        The Call: input index -> (status code name, batch size).
    """
    codec, samples = engine.runner.codec, workload.samples

    async def call(i: int) -> tuple[str, int]:
        try:
            future = engine.submit(prepare(codec, samples[i % len(samples)], attention))
            return "OK", (await asyncio.wrap_future(future)).batch_size
        except RequestError as e:
            return e.code.name, 0

    return call


async def _measure(cfg: BenchConfig, kind: str, model: str, call: Call, server_processes) -> list[Row]:
    """Warm-up, then a timed closed loop per concurrency, with the CPU spent on both sides.

    server_processes: the server's processes, or None when the server is this process.
    """
    rows = []
    for c in cfg.concurrency:
        await closed_loop(call, c, max(cfg.warmup, 2 * c))
        meter = CpuMeter(server_processes() if server_processes else [])
        outcomes, wall = await closed_loop(call, c, cfg.requests, cfg.max_seconds)
        spent = meter.read()
        if server_processes is None:  # in-process: the server is this process
            server = {"this process": spent.client}
        else:  # a remote target's processes are not ours to see
            server = spent.server if meter.servers else None
        rows.append(_row(kind, model, c, outcomes, wall, server, spent))
        r = rows[-1]
        print(f"  {kind:<10} {model:<18} c={c:<3d} {r.req_per_s:8.1f} req/s  p50 {r.p50_ms} ms", flush=True)
    return rows


def _row(kind: str, model: str, concurrency: int, outcomes, wall: float, server: dict[str, float] | None,
         cpu: CpuSpent) -> Row:  # fmt: skip
    """A Row from one closed loop's outcomes and CPU seconds (server: by process role, None if
    unknown)."""
    ok = [o for o in outcomes if o.code == "OK"]
    n = len(outcomes)
    p50, p99 = percentiles_ms([o.seconds for o in ok], 50, 99)

    def per_call(seconds: float) -> float | None:
        return round(1000 * seconds / n, 2) if n else None

    return Row(
        kind, model, concurrency, n, round(wall, 2), round(len(ok) / wall, 1) if wall else 0.0, p50, p99,
        round(float(np.mean([o.batch_size for o in ok])), 2) if ok else None,
        per_call(sum(server.values())) if server is not None else None, per_call(cpu.client),
        round(max(cpu.other, 0.0) / wall, 2) if wall else None, codes(outcomes),
        {name: per_call(s) for name, s in sorted(server.items())} if server else {},
    )  # fmt: skip


def ratios(rows: list[Row]) -> list[dict]:
    """ray / plain req/s per model and concurrency, where both were measured."""
    by_key = {(r.kind, r.model, r.concurrency): r for r in rows}
    out = []
    for r in rows:
        plain = by_key.get(("plain", r.model, r.concurrency))
        if r.kind == "ray" and plain and plain.req_per_s:
            out.append({"model": r.model, "concurrency": r.concurrency,
                        "ray_over_plain": round(r.req_per_s / plain.req_per_s, 2)})  # fmt: skip
    return out


COLUMNS = (("model", "<18"), ("conc", ">4"), ("path", "<10"), ("req/s", ">8"), ("p50 ms", ">8"),
           ("p99 ms", ">8"), ("batch", ">6"), ("srv CPU ms", ">10"), ("gen CPU ms", ">10"), ("others", ">6"),
           ("ray/plain", ">9"), ("errors", ""))  # fmt: skip
LEGEND = (
    "srv / gen CPU ms: CPU per call of the server's processes / of the load generator (in-process: both\n"
    "are this process); others: cores busy with anything else on this machine meanwhile (should be ~0)"
)


def print_table(rows: list[Row]) -> None:
    """The rows grouped by model and concurrency, with ray/plain and the ray CPU by process."""
    ratio = {(x["model"], x["concurrency"]): x["ray_over_plain"] for x in ratios(rows)}
    header = " ".join(f"{name:{align}}" for name, align in COLUMNS)
    print("\n" + header + "\n" + "-" * len(header))
    order = {k: i for i, k in enumerate(KINDS)}
    for r in sorted(rows, key=lambda r: (r.model, r.concurrency, order.get(r.kind, 9))):
        errors = ", ".join(f"{k} {v}" for k, v in r.codes.items() if k != "OK")
        x = ratio.get((r.model, r.concurrency)) if r.kind == "ray" else None
        figures = (r.p50_ms, r.p99_ms, r.mean_batch, r.server_cpu_ms, r.client_cpu_ms, r.other_cores, x)
        values = (r.model, r.concurrency, r.kind, f"{r.req_per_s:.1f}", *map(fmt, figures), errors)
        print(" ".join(f"{v:{align}}" for v, (_, align) in zip(values, COLUMNS, strict=True)))
    print(LEGEND)
    disturbed = [r for r in rows if (r.other_cores or 0) >= BUSY_ELSEWHERE]
    if disturbed:
        print(f"warning: {len(disturbed)} of {len(rows)} rows ran while other work used >= {BUSY_ELSEWHERE} "
              "cores of this machine (column 'others'); compare ratios from a quiet machine")  # fmt: skip
    split = [r for r in rows if r.cpu_by_process and r.kind == "ray"]
    if split:
        print("\nray server CPU ms per call, by process:")
    for r in split:
        parts = sorted(r.cpu_by_process.items(), key=lambda kv: -kv[1])
        print(f"  {r.model:<18} c={r.concurrency:<3d} " + ", ".join(f"{k} {v:.2f}" for k, v in parts))


def fmt(value: float | None) -> str:
    """A figure for a table: two decimals, or - when there is none."""
    return "-" if value is None else f"{value:.2f}"


def write_json(path: Path, payload: dict) -> None:
    """Writes the payload with a description of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps({"machine": machine, **payload}, indent=2) + "\n")
    print(f"\nwrote {path}")


def jsonable(config: dict) -> dict:
    """A config dict with paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}
