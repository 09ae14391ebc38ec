"""The bench's parts without Ray: inputs of every model, load generators, in-process and plain rows."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import psutil
import pytest
import yaml

from attnserve.bench import loadgen
from attnserve.bench.inputs import load_workload
from attnserve.bench.loadgen import Outcome, closed_loop, open_loop, poisson_arrivals, recovery_seconds
from attnserve.bench.run import BenchConfig, Row, ratios, run_bench
from attnserve.bench.tls import TlsRow, overhead
from attnserve.cli.main import build_parser
from attnserve.core.codec import SourceCodec
from attnserve.core.manifest import discover
from attnserve.core.requests import AttentionMode
from attnserve.v1 import translator_pb2 as pb
from tests.conftest import BUNDLED_REPOSITORY, ROOT

MANIFESTS = {m.name: m for m in discover(BUNDLED_REPOSITORY)}
SERVE_CONFIG = ROOT / "deploy" / "serve" / "attnserve.yaml"


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_every_bundled_model_gets_valid_test_inputs_with_attention(name):
    manifest = MANIFESTS[name]
    workload = load_workload(manifest, count=40)
    assert len(workload.samples) == len(workload.requests) >= 30
    assert len(set(workload.requests[i].SerializeToString() for i in range(10))) == 10  # not one input
    want = pb.CaptionRequest if manifest.image else pb.TranslateRequest
    assert workload.rpc == want.DESCRIPTOR.name.removesuffix("Request")
    codec = SourceCodec(manifest)
    for sample, request in zip(workload.samples, workload.requests, strict=True):
        assert isinstance(request, want) and request.model == name
        assert request.options.attention == pb.ATTENTION_MODE_CROSS
        if manifest.image:
            assert sample.image.startswith(b"\x89PNG")
        else:
            codec.prepare(sample.text, AttentionMode.CROSS, locale=sample.locale)  # valid for the model
    if manifest.reads_locale:
        assert all(s.locale for s in workload.samples)


def _sleeper(seconds: float, code: str = "OK"):
    in_flight, peak = 0, []

    async def call(i: int) -> tuple[str, int]:
        nonlocal in_flight
        in_flight += 1
        peak.append(in_flight)
        await asyncio.sleep(seconds)
        in_flight -= 1
        return code, 1

    return call, peak


def test_closed_loop_keeps_concurrency_calls_in_flight_and_stops_at_the_count_or_the_time():
    call, peak = _sleeper(0.01)
    outcomes, wall = asyncio.run(closed_loop(call, 4, 40))
    assert len(outcomes) == 40 and max(peak) == 4 and 0.09 < wall < 1
    call, _ = _sleeper(0.01)
    outcomes, wall = asyncio.run(closed_loop(call, 2, 10**6, max_seconds=0.2))
    assert 20 < len(outcomes) < 50 and wall < 0.5


def test_poisson_arrivals_have_the_rate_stay_in_the_window_and_repeat_with_the_seed():
    arrivals = poisson_arrivals(500, 4.0, seed=3)
    assert np.all(np.diff(arrivals) >= 0) and arrivals[0] >= 0 and arrivals[-1] < 4.0
    assert 1800 < len(arrivals) < 2200
    assert np.array_equal(arrivals, poisson_arrivals(500, 4.0, seed=3))
    assert not np.array_equal(arrivals, poisson_arrivals(500, 4.0, seed=4))


def test_open_loop_sends_on_schedule_without_waiting_for_answers():
    call, peak = _sleeper(0.3)  # answers far slower than arrivals: an open loop does not slow down
    arrivals = poisson_arrivals(200, 1.0, seed=0)
    sent_at = []
    result = asyncio.run(open_loop(call, arrivals, lambda: sent_at.append(time.perf_counter())))
    assert len(result.outcomes) == len(arrivals)
    assert result.achieved_rate == pytest.approx(result.intended_rate, rel=0.15)
    # Calls created while the loop is behind count as in flight before they start running.
    assert max(peak) > 30 and 0 <= result.max_in_flight - max(peak) <= 3
    assert sent_at and sent_at[0] <= max(o.sent + o.seconds for o in result.outcomes)


def _probe(sent: float, ms: float, code: str = "OK") -> Outcome:
    return Outcome(sent, ms / 1000, code, 1)


def test_recovery_is_the_start_of_the_first_run_of_good_probes():
    ms = [50, 5, 50, 5, 5, 5, 5, 5]  # the probe at 10.4 s is fast but failed
    probes = [_probe(10 + i / 10, m, "UNAVAILABLE" if i == 4 else "OK") for i, m in enumerate(ms)]
    assert recovery_seconds(probes, since=10.0, threshold_s=0.01) == pytest.approx(0.5)
    assert recovery_seconds(probes[:7], since=10.0, threshold_s=0.01) is None
    assert recovery_seconds([_probe(9.0, 5)] * 3, since=10.0, threshold_s=0.01) == 0.0
    assert loadgen.percentiles_ms([], 50, 99) == (None, None)


def _row(kind: str, model: str, concurrency: int, rate: float) -> Row:
    return Row(kind, model, concurrency, 10, 1.0, rate, 1.0, 2.0, 1.0, None, None, None)


def test_ratios_pair_ray_with_plain_per_model_and_concurrency():
    rows = [_row("ray", "a", 32, 300), _row("plain", "a", 32, 400), _row("in-process", "a", 32, 900),
            _row("ray", "b", 1, 50), _row("ray", "a", 8, 10)]  # fmt: skip
    assert ratios(rows) == [{"model": "a", "concurrency": 32, "ray_over_plain": 0.75}]


def test_tls_overhead_is_throughput_lost_and_p50_added_against_plaintext():
    def row(path: str, rate: float, p50: float) -> TlsRow:
        return TlsRow(path, "a", 32, 100, 1.0, rate, p50, 2 * p50, 1.0, {"OK": 100})

    rows = [row("plaintext", 500, 50.0), row("tls", 460, 50.5)]
    assert overhead(rows) == [
        {"model": "a", "concurrency": 32, "throughput_loss_pct": 8.0, "p50_added_ms": 0.5}
    ]
    assert build_parser().parse_args(["bench", "--tls"]).tls


def test_in_process_rows_measure_the_engine_and_write_json(tmp_path):
    out = tmp_path / "bench.json"
    cfg = BenchConfig(models=("g2p-bahdanau",), kinds=("in-process",), repository=BUNDLED_REPOSITORY,
                      serve_config=SERVE_CONFIG, concurrency=(1, 4), requests=30, warmup=4, inputs=50,
                      out=out)  # fmt: skip
    rows = run_bench(cfg)
    assert [(r.kind, r.concurrency, r.requests, r.codes) for r in rows] == [
        ("in-process", 1, 30, {"OK": 30}), ("in-process", 4, 30, {"OK": 30}),
    ]  # fmt: skip
    assert rows[0].mean_batch == 1.0 and rows[1].mean_batch >= 1.0
    assert all(r.req_per_s > 0 and r.p50_ms <= r.p99_ms and r.server_cpu_ms > 0 for r in rows)
    written = json.loads(out.read_text())
    assert len(written["rows"]) == 2 and written["machine"]["cpus"] >= 1


@pytest.mark.integration
def test_plain_server_runs_in_its_own_process_and_is_stopped(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cfg = BenchConfig(models=("dates-luong",), kinds=("plain",), repository=BUNDLED_REPOSITORY,
                      serve_config=SERVE_CONFIG, concurrency=(8,), requests=40, warmup=8, inputs=50,
                      out=tmp_path / "b.json")  # fmt: skip
    (row,) = run_bench(cfg)
    assert (row.kind, row.requests, row.codes) == ("plain", 40, {"OK": 40})
    assert row.server_cpu_ms > 0 and set(row.cpu_by_process) == {"plain"}
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_bench_command_line():
    parse = build_parser().parse_args
    args = parse(["bench", "--model", "a", "--model", "b", "--kind", "plain"])
    assert (args.model, args.kind, args.overload) == (["a", "b"], ["plain"], False)
    assert (
        args.concurrency is None and args.requests == 1000
    )  # each bench's own default (BenchConfig: 1 8 32)
    assert parse(["bench", "--replicas", "1", "2", "--concurrency", "32"]).replicas == [1, 2]
    args = parse(["bench", "--overload", "--overload-factor", "2"])
    assert args.overload and args.overload_factor == 2 and args.model is None
    args = parse(["bench", "--overload", "--model", "a", "--model", "b"])
    assert args.handler(args) == 2  # an overload runs one model
    args = parse(["bench", "--burst"])
    assert args.burst and (args.burst_calls, args.burst_concurrency, args.burst_connections) == (
        3000,
        1500,
        [30, 1],
    )
    args = parse(["bench", "--burst", "--burst-connections", "4", "--model", "a", "--model", "b"])
    assert args.burst_connections == [4] and args.handler(args) == 2  # a burst runs one model


def test_a_burst_keeps_concurrency_calls_in_flight_and_sends_every_call():
    from attnserve.bench.burst import Call, fire

    in_flight, peak = 0, 0

    async def call(i: int) -> Call:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01 if i % 2 else 0.001)
        in_flight -= 1
        return Call(0.01, "OK" if i % 2 else "RESOURCE_EXHAUSTED", "")

    answered = asyncio.run(fire(call, 100, 40))
    assert len(answered) == 100 and peak == 40


def test_burst_report_times_each_status_and_message_and_checks_the_targets(capsys):
    from attnserve.bench.burst import BurstRun, Call, answered_by, checks, print_run, summarise

    calls = [Call(1.5, "OK", "")] * 10 + [Call(0.002, "RESOURCE_EXHAUSTED", "full; retry")] * 90
    calls += [Call(0.8, "RESOURCE_EXHAUSTED", "overloaded (expected wait over 2 s)")] * 10
    by_code = summarise(calls)
    assert list(by_code) == ["RESOURCE_EXHAUSTED", "OK"]
    refused = by_code["RESOURCE_EXHAUSTED"]
    assert refused.count == 100 and refused.max_ms == 800
    assert refused.messages["full; retry"].p99_ms == 2 and refused.messages["full; retry"].count == 90
    assert checks(by_code) == {"no status but OK, RESOURCE_EXHAUSTED": True, "refusals p99 <= 1000 ms": True}
    late = summarise([*calls, Call(0.001, "CANCELLED", "CANCELLED"), Call(1.2, "RESOURCE_EXHAUSTED", "x")])
    assert list(checks(late).values()) == [False, True]
    # HAProxy's access log: a call it refused itself (no server) and one a replica answered.
    lines = [
        "<134>Dec  5 15:30:13 haproxy[1]: 127.0.0.1:55860 [05/Dec/2026:15:30:13.884] grpc_frontend "
        'grpc-attnserve/<NOSRV> 20/-1/-1/-1/20 200 185 - - LR-- 30/30/384/0/0 0/0 "POST /x HTTP/2.0"',
        "<134>Dec  5 15:05:58 haproxy[1]: 127.0.0.1:38232 [05/Dec/2026:15:05:58.078] grpc_frontend "
        'grpc-attnserve/SERVE_REPLICA_a 0/0/0/56/56 200 739 - - ---- 30/30/15/15/0 0/0 "POST /x HTTP/2.0"',
        "<134>Dec  5 15:05:58 haproxy[1]: Server grpc-attnserve/SERVE_REPLICA_a is UP",
    ]
    timed = answered_by(lines)
    assert (timed["haproxy"].count, timed["haproxy"].p50_ms) == (1, 20)
    assert (timed["replica"].count, timed["replica"].max_ms) == (1, 56)
    run = BurstRun(30, 110, 50, 1.0, by_code, 10.0, 1.0, 0.3, 0.0, 2.0, None, timed, checks(by_code))
    print_run(run)
    out = capsys.readouterr().out
    assert "full; retry" in out and "answered by haproxy" in out and "PASS  refusals p99" in out


def test_overload_report_counts_statuses_and_checks_the_targets(capsys):
    from attnserve.bench.loadgen import OpenLoopResult
    from attnserve.bench.overload import Before, OverloadConfig, Storm, _report, print_report

    outcomes = [Outcome(i / 100, 0.5, "OK", 4) for i in range(50)]
    outcomes += [Outcome(i / 100, 0.005, "RESOURCE_EXHAUSTED", 0) for i in range(100)]
    outcomes += [Outcome(1.0, 10.0, "DEADLINE_EXCEEDED", 0), Outcome(1.0, 0.1, "INTERNAL", 0)]
    result = OpenLoopResult(tuple(outcomes), 150.0, 149.0, 0.0, 1.0, 60)
    probes = tuple(_probe(1.0 + i / 10, 50 if i < 5 else 10) for i in range(20))
    storm = Storm(result, probes, 1.2, 0.4, 0.0, (0.001,))
    report = _report(OverloadConfig(), Before(10.0, 50.0, 2.0), storm)
    assert (report.accepted.count, report.rejected.count, report.calls) == (50, 100, 152)
    assert report.accepted.p99_ms == 500 and report.rejected.p99_ms == 5
    assert report.codes == {"OK": 50, "RESOURCE_EXHAUSTED": 100, "DEADLINE_EXCEEDED": 1, "INTERNAL": 1}
    assert report.recovery_s == pytest.approx(0.5) and report.recovery_threshold_ms == 20
    assert list(report.checks.values()) == [True, True, False, True]  # INTERNAL is not allowed
    print_report(report)
    assert "FAIL  no status but OK, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED" in capsys.readouterr().out


def test_loop_lag_samples_until_stopped():
    async def run() -> list[float]:
        stop = asyncio.Event()
        task = asyncio.ensure_future(loadgen.loop_lag(stop, period_s=0.005))
        await asyncio.sleep(0.1)
        stop.set()
        return await task

    lags = asyncio.run(run())
    assert 5 <= len(lags) <= 25 and all(lag >= 0 for lag in lags)


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_replicas_bench_serves_the_shipped_config_with_that_many_replicas(tmp_path, replicas):
    from attnserve.bench.replicas import with_replicas
    from attnserve.service.config import app_args

    shipped = yaml.safe_load((ROOT / "deploy/serve/attnserve.yaml").read_text())
    shipped["applications"][0]["args"]["replica"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3}
    (tmp_path / "autoscaled.yaml").write_text(yaml.safe_dump(shipped))
    args = app_args(with_replicas(tmp_path / "autoscaled.yaml", replicas, tmp_path))
    assert (args.replica.num_replicas, args.replica.num_cpus, args.replica.autoscaling) == (replicas, 1, None)
    assert args.serving == app_args(ROOT / "deploy/serve/attnserve.yaml").serving
