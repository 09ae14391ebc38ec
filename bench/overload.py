"""`attnserve bench --overload`: open-loop Poisson arrivals at a multiple of capacity, then recovery.

1. baseline: c=1 calls, their p50 is "normal latency";
2. capacity: closed loop at c=32, its req/s;
3. storm: Poisson arrivals at factor x capacity for a while, each call with a client deadline,
   round-robin over a few grpc.aio channels (HTTP/2 connections), never waiting for answers;
4. recovery: c=1 calls from the moment the last storm call was sent (while the storm's accepted
   calls still finish): the time until latency is back within 2x the baseline p50.

Reports accepted (OK) and rejected (RESOURCE_EXHAUSTED) counts and latencies, every other
status, the intended and achieved arrival rate and the server's CPU; checks the issue's targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from attnserve.bench.inputs import load_workload
from attnserve.bench.loadgen import (
    Call,
    Latency,
    OpenLoopResult,
    Outcome,
    closed_loop,
    codes,
    loop_lag,
    open_loop,
    percentiles_ms,
    poisson_arrivals,
    recovery_seconds,
)
from attnserve.bench.run import fmt, grpc_call, jsonable, write_json
from attnserve.bench.servers import CpuMeter, Target, ray_service
from attnserve.core.manifest import discover
from attnserve.service.config import DEFAULT_SERVE_CONFIG, app_args

ALLOWED = ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # the statuses an overloaded service may give
REJECTION_P99_TARGET_MS = 50.0
RECOVERY_TARGET_S = 5.0


@dataclass(frozen=True)
class OverloadConfig:
    """What to run.

    factor: arrival rate as a multiple of the measured capacity.
    deadline_s: each call's client deadline (gRPC's, and the metadata the Ray path reads).
    channels: grpc.aio channels the storm's calls are spread over (one HTTP/2 connection each).
    """

    model: str = "en-fr-transformer"
    repository: Path = Path("model_repository")
    serve_config: Path = DEFAULT_SERVE_CONFIG
    target: str | None = None
    factor: float = 3.0
    seconds: float = 20.0
    deadline_s: float = 10.0
    channels: int = 4
    capacity_concurrency: int = 32
    capacity_seconds: float = 8.0
    baseline_calls: int = 50
    recovery_seconds: float = 10.0
    recovery_factor: float = 2.0
    seed: int = 0
    out: Path = Path("bench/results/overload.json")


@dataclass(frozen=True)
class OverloadReport:
    """What the storm did and how fast latency came back."""

    model: str
    baseline_p50_ms: float | None
    capacity_req_per_s: float
    intended_rate: float
    achieved_rate: float
    max_send_lag_ms: float | None
    max_in_flight: int
    calls: int
    accepted: Latency
    rejected: Latency
    codes: dict[str, int]
    accepted_per_s: float
    server_cpu_cores: float | None
    client_cpu_cores: float
    other_cores: float
    client_loop_lag_p99_ms: float | None
    recovery_s: float | None
    recovery_threshold_ms: float | None
    recovery_probes: int
    max_queue_wait_s: float
    checks: dict[str, bool]


def run_overload(cfg: OverloadConfig) -> OverloadReport:
    """Runs the overload against a new Ray service (or cfg.target); prints and writes JSON.

    Args:
        cfg: what to run.

    Returns:
        The report.
    """
    manifest = next((m for m in discover(cfg.repository) if m.name == cfg.model), None)
    if manifest is None:
        raise ValueError(f"model {cfg.model!r} is not in {cfg.repository}")
    workload = load_workload(manifest)
    max_wait = app_args(cfg.serve_config, cfg.repository).serving.for_model(cfg.model).max_queue_wait_s
    with _service(cfg) as target:
        report = asyncio.run(_overload(cfg, target, workload, max_wait))
    print_report(report)
    write_json(cfg.out, {"config": jsonable(asdict(cfg)), "report": asdict(report)})
    return report


@contextlib.contextmanager
def _service(cfg: OverloadConfig) -> Iterator[Target]:
    """cfg.target, or a new Ray service that is stopped afterwards."""
    if cfg.target:
        yield Target("ray", cfg.target)
    else:
        print("starting attnserve (local Ray) ...", flush=True)
        with ray_service(cfg.repository, cfg.serve_config) as target:
            yield target


@dataclass(frozen=True)
class Before:
    """What was measured before the storm, and the service's admitted queue wait."""

    baseline_p50_ms: float | None
    capacity: float
    max_queue_wait_s: float


@dataclass(frozen=True)
class Storm:
    """The open loop's calls, the recovery probes, and the CPU cores busy meanwhile."""

    result: OpenLoopResult
    probes: tuple[Outcome, ...]
    server_cores: float | None
    client_cores: float
    other_cores: float
    loop_lags: tuple[float, ...]  # how late the generator's event loop woke, sampled every 10 ms


async def _overload(cfg: OverloadConfig, target: Target, workload, max_wait: float) -> OverloadReport:
    """Baseline, capacity, storm with recovery probes; the report."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own for each channel
    channels = [grpc.aio.insecure_channel(target.address, options=options) for _ in range(cfg.channels)]
    try:
        call = grpc_call(channels, workload, cfg.deadline_s)
        probe = grpc_call(channels[:1], workload, cfg.deadline_s)
        await closed_loop(call, cfg.capacity_concurrency, 2 * cfg.capacity_concurrency)  # warm-up
        baseline, _ = await closed_loop(probe, 1, cfg.baseline_calls)
        measured, wall = await closed_loop(call, cfg.capacity_concurrency, 10**9, cfg.capacity_seconds)
        before = Before(
            percentiles_ms([o.seconds for o in baseline if o.code == "OK"], 50)[0],
            sum(o.code == "OK" for o in measured) / wall,
            max_wait,
        )
        rate = cfg.factor * before.capacity
        print(f"baseline c=1 p50 {before.baseline_p50_ms} ms; capacity {before.capacity:.1f} req/s; "
              f"storm at {rate:.1f}/s for {cfg.seconds:g} s ...", flush=True)  # fmt: skip
        return _report(cfg, before, await _storm(cfg, target, call, probe, rate))
    finally:
        for channel in channels:
            await channel.close()


async def _storm(cfg: OverloadConfig, target: Target, call: Call, probe: Call, rate: float) -> Storm:
    """The open loop, with c=1 probes from the moment its last call is sent."""
    probes: list[Outcome] = []
    probing: list[asyncio.Task] = []

    async def probe_for(seconds: float) -> None:
        outcomes, _ = await closed_loop(probe, 1, 10**9, seconds)
        probes.extend(outcomes)

    def start_probing() -> None:
        probing.append(asyncio.ensure_future(probe_for(cfg.recovery_seconds)))

    meter, stop, started = CpuMeter(target.processes()), asyncio.Event(), time.perf_counter()
    lags = asyncio.ensure_future(loop_lag(stop))
    result = await open_loop(call, poisson_arrivals(rate, cfg.seconds, cfg.seed), start_probing)
    await asyncio.gather(*probing)
    stop.set()
    wall, spent = time.perf_counter() - started, meter.read()
    server = round(sum(spent.server.values()) / wall, 2) if meter.servers else None
    return Storm(result, tuple(probes), server, round(spent.client / wall, 2),
                 round(max(spent.other, 0.0) / wall, 2), tuple(await lags))  # fmt: skip


def _report(cfg: OverloadConfig, before: Before, storm: Storm) -> OverloadReport:
    """The report of one storm, with the targets checked."""
    result = storm.result
    accepted, rejected = _phase(result.outcomes, "OK"), _phase(result.outcomes, "RESOURCE_EXHAUSTED")
    threshold = cfg.recovery_factor * before.baseline_p50_ms / 1000 if before.baseline_p50_ms else None
    recovered = recovery_seconds(list(storm.probes), result.ended, threshold) if threshold else None
    counted = codes(result.outcomes)
    lags = [o.lag for o in result.outcomes]
    span = max(o.sent + o.seconds for o in result.outcomes) - result.started if result.outcomes else 0.0
    return OverloadReport(
        model=cfg.model,
        baseline_p50_ms=before.baseline_p50_ms,
        capacity_req_per_s=round(before.capacity, 1),
        intended_rate=round(result.intended_rate, 1),
        achieved_rate=round(result.achieved_rate, 1),
        max_send_lag_ms=round(1000 * max(lags), 1) if lags else None,
        max_in_flight=result.max_in_flight,
        calls=len(result.outcomes),
        accepted=accepted,
        rejected=rejected,
        codes=counted,
        accepted_per_s=round(accepted.count / span, 1) if span else 0.0,
        server_cpu_cores=storm.server_cores,
        client_cpu_cores=storm.client_cores,
        other_cores=storm.other_cores,
        client_loop_lag_p99_ms=percentiles_ms(list(storm.loop_lags), 99)[0],
        recovery_s=recovered,
        recovery_threshold_ms=round(1000 * threshold, 2) if threshold else None,
        recovery_probes=len(storm.probes),
        max_queue_wait_s=before.max_queue_wait_s,
        checks=_checks(accepted, rejected, counted, recovered, before.max_queue_wait_s),
    )


def _phase(outcomes, code: str) -> Latency:
    """Count and latency of the calls that ended with `code`."""
    return Latency.of([o.seconds for o in outcomes if o.code == code])


def _checks(accepted: Latency, rejected: Latency, counted: dict[str, int], recovered: float | None,
            max_wait_s: float) -> dict[str, bool]:  # fmt: skip
    """The issue's overload targets, each passed or not."""
    return {
        "accepted p99 <= max queue wait + 1 s": accepted.p99_ms is not None
        and accepted.p99_ms <= 1000 * (max_wait_s + 1),
        f"rejections p99 <= {REJECTION_P99_TARGET_MS:g} ms": rejected.p99_ms is None
        or rejected.p99_ms <= REJECTION_P99_TARGET_MS,
        "no status but " + ", ".join(ALLOWED): set(counted) <= set(ALLOWED),
        f"normal latency within {RECOVERY_TARGET_S:g} s": recovered is not None
        and recovered <= RECOVERY_TARGET_S,
    }


def print_report(r: OverloadReport) -> None:
    """The report as a small table."""
    print(f"\noverload: {r.model}, {r.calls} calls; capacity {r.capacity_req_per_s} req/s at c=32; "
          f"arrivals intended {r.intended_rate}/s, achieved {r.achieved_rate}/s (max send lag "
          f"{r.max_send_lag_ms} ms, {r.max_in_flight} in flight at most)")  # fmt: skip
    header = f"{'status':<20} {'calls':>7} {'p50 ms':>9} {'p99 ms':>9}"
    print(header + "\n" + "-" * len(header))
    for name, phase in (("OK (accepted)", r.accepted), ("RESOURCE_EXHAUSTED", r.rejected)):
        print(f"{name:<20} {phase.count:>7} {fmt(phase.p50_ms):>9} {fmt(phase.p99_ms):>9}")
    for code, count in sorted(r.codes.items()):
        if code not in ("OK", "RESOURCE_EXHAUSTED"):
            print(f"{code:<20} {count:>7} {'-':>9} {'-':>9}")
    print(f"accepted {r.accepted_per_s} req/s during the storm; CPU cores busy: server "
          f"{fmt(r.server_cpu_cores)}, load generator {r.client_cpu_cores}, anything else {r.other_cores}; "
          f"generator's event loop late by {fmt(r.client_loop_lag_p99_ms)} ms at p99")  # fmt: skip
    recovery = "never" if r.recovery_s is None else f"{r.recovery_s} s"
    print(f"recovery: c=1 latency back within {fmt(r.recovery_threshold_ms)} ms (2x the c=1 p50 "
          f"{fmt(r.baseline_p50_ms)} ms before the storm) after {recovery} "
          f"({r.recovery_probes} probes)")  # fmt: skip
    print(f"targets (max queue wait {r.max_queue_wait_s:g} s):")
    for name, passed in r.checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
