"""`attnserve bench`: the serving benchmarks (closed-loop paths, --overload, --burst, --step-batching,
--tls, --replicas)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    if args.replicas:
        from attnserve.bench.replicas import ReplicasConfig, run_replicas

        run_replicas(
            ReplicasConfig(
                counts=tuple(args.replicas), models=tuple(args.model or ReplicasConfig.models),
                repository=args.repository, serve_config=args.serve_config or ReplicasConfig.serve_config,
                concurrency=tuple(args.concurrency or ReplicasConfig.concurrency),
                out=args.out or ReplicasConfig.out,
            )
        )  # fmt: skip
        return 0
    if args.step_batching:
        from attnserve.bench.batching import BatchingConfig, run_batching

        models = tuple(args.model or BatchingConfig.models)
        run_batching(
            BatchingConfig(models=models, repository=args.repository, out=args.out or BatchingConfig.out)
        )
        return 0
    if (args.burst or args.overload) and args.model and len(args.model) > 1:
        print(f"error: --{'burst' if args.burst else 'overload'} runs one --model", file=sys.stderr)
        return 2
    if args.burst:
        from attnserve.bench.burst import BurstConfig, run_burst

        run_burst(
            BurstConfig(
                model=args.model[0] if args.model else BurstConfig.model, repository=args.repository,
                serve_config=args.serve_config or BurstConfig.serve_config, target=args.target,
                calls=args.burst_calls, concurrency=args.burst_concurrency,
                connections=tuple(args.burst_connections), deadline_s=args.deadline,
                haproxy_socket=args.haproxy_socket, out=args.out or BurstConfig.out,
            )
        )  # fmt: skip
        return 0
    if args.overload:
        from attnserve.bench.overload import OverloadConfig, run_overload

        run_overload(
            OverloadConfig(
                model=args.model[0] if args.model else OverloadConfig.model, repository=args.repository,
                serve_config=args.serve_config or OverloadConfig.serve_config, target=args.target,
                factor=args.overload_factor, seconds=args.overload_seconds, deadline_s=args.deadline,
                out=args.out or OverloadConfig.out,
            )
        )  # fmt: skip
        return 0
    from attnserve.bench.run import KINDS, BenchConfig, run_bench

    run, out = run_bench, args.out or BenchConfig.out
    if args.tls:
        from attnserve.bench.tls import run_tls_bench as run

        out = args.out or Path("bench/results/tls.json")
    run(
        BenchConfig(
            models=tuple(args.model or ()), kinds=tuple(args.kind or KINDS), repository=args.repository,
            serve_config=args.serve_config or BenchConfig.serve_config, target=args.target,
            concurrency=tuple(args.concurrency or BenchConfig.concurrency), requests=args.requests,
            max_seconds=args.max_seconds,
            out=out,
        )
    )  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds bench to the `attnserve` subparsers."""
    p = sub.add_parser("bench", help="every model at concurrency 1/8/32: Ray path, plain gRPC, in-process")
    p.add_argument("--model", action="append", help="a model to measure (repeatable; default: every model)")
    p.add_argument("--kind", action="append", choices=("ray", "plain", "in-process"),
                   help="a serving path to measure (repeatable; default: all three)")  # fmt: skip
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--serve-config", type=Path, help="the service and every path's engine settings "
                   "(deploy/serve/attnserve.yaml)")  # fmt: skip
    p.add_argument("--target", help="measure this running service (HOST:PORT) instead of starting Ray")
    p.add_argument("--concurrency", type=int, nargs="+", help="calls in flight (1 8 32; --replicas: 32 64)")
    p.add_argument("--requests", type=int, default=1000, help="calls per model and concurrency at most")
    p.add_argument("--max-seconds", type=float, default=6.0, help="time per model and concurrency at most")
    p.add_argument("--out", type=Path, help="JSON results (bench/results/bench.json, overload.json, ...)")
    p.add_argument("--overload", action="store_true", help="open-loop arrivals at a multiple of capacity "
                   "instead, on the Ray path (default model en-fr-transformer)")  # fmt: skip
    p.add_argument("--burst", action="store_true", help="N calls at once at concurrency C over K "
                   "connections, then over one (Ray path, en-fr-transformer): each status's count and "
                   "time to answer; bench/results/burst.json")  # fmt: skip
    p.add_argument("--burst-calls", type=int, default=3000, help="burst: calls (3000)")
    p.add_argument("--burst-concurrency", type=int, default=1500, help="burst: calls in flight (1500)")
    p.add_argument("--burst-connections", type=int, nargs="+", default=[30, 1],
                   help="burst: one burst per entry, over that many HTTP/2 connections (30 1)")  # fmt: skip
    p.add_argument("--haproxy-socket", help="burst with --target: HAProxy's admin socket, for its counters")
    p.add_argument("--step-batching", action="store_true",
                   help="step-level against request-level batching in-process under Poisson load "
                   "(en-fr-transformer, g2p-bahdanau, dates-luong)")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="TLS against plaintext on one Ray service, side by "
                   "side (default model g2p-bahdanau); bench/results/tls.json")  # fmt: skip
    p.add_argument("--overload-factor", type=float, default=3.0, help="arrival rate / capacity (3)")
    p.add_argument("--overload-seconds", type=float, default=20.0, help="length of the storm (20 s)")
    p.add_argument("--replicas", type=int, nargs="+", help="the Ray service with each of these numbers of "
                   "replicas in turn, side by side (e.g. 1 2; g2p-bahdanau, en-fr-transformer); "
                   "bench/results/replicas.json")  # fmt: skip
    p.add_argument("--deadline", type=float, default=10.0, help="overload, burst: a call's deadline (10 s)")
    p.set_defaults(handler=_bench)
