"""`attnserve bench --replicas 1 2`: the real service with 1 replica against 2 on this machine, side by
side in one run; bench/results/replicas.json.

For each replica count in turn (then the first again, to see the machine drift), a local Ray
service is started from the serve config with `num_replicas` set (1 CPU each), and every model is
loaded in a closed loop at each concurrency, as `attnserve bench --kind ray` does (one gRPC
connection; HAProxy spreads its calls over the replicas). The load generator runs on the same
machine, so on a small host it takes cores the second replica would use: its CPU per call is
printed beside the figures. The load average is recorded before and after each service's run.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from attnserve.bench.run import BenchConfig, Row, _over_grpc, jsonable, load_workloads, write_json
from attnserve.bench.servers import ray_service
from attnserve.service.config import DEFAULT_SERVE_CONFIG


@dataclass(frozen=True)
class ReplicasConfig:
    """What to measure: `counts` replicas in turn (the first again at the end when `recheck`)."""

    counts: tuple[int, ...] = (1, 2)
    models: tuple[str, ...] = ("g2p-bahdanau", "en-fr-transformer")
    repository: Path = Path("model_repository")
    serve_config: Path = DEFAULT_SERVE_CONFIG
    concurrency: tuple[int, ...] = (32, 64)
    requests: int = 6000
    max_seconds: float = 10.0
    recheck: bool = True
    out: Path = Path("bench/results/replicas.json")


def with_replicas(serve_config: Path, replicas: int, folder: Path) -> Path:
    """A copy of the serve config whose applications run `replicas` replicas of 1 CPU each."""
    raw = yaml.safe_load(serve_config.read_text())
    for app in raw["applications"]:
        replica = app.setdefault("args", {}).setdefault("replica", {})
        replica.pop("autoscaling", None)
        replica |= {"num_replicas": replicas, "num_cpus": 1}
    path = folder / f"serve-{replicas}-replicas.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def loadavg() -> str:
    """/proc/loadavg's three averages."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_replicas(cfg: ReplicasConfig) -> list[dict]:
    """Measures each replica count; prints a side-by-side table and writes JSON to cfg.out."""
    workloads = load_workloads(cfg.repository, cfg.models, BenchConfig.inputs, True)
    bench = BenchConfig(models=cfg.models, kinds=("ray",), repository=cfg.repository,
                        concurrency=cfg.concurrency, requests=cfg.requests,
                        max_seconds=cfg.max_seconds)  # fmt: skip
    runs = [*cfg.counts, cfg.counts[0]] if cfg.recheck and len(cfg.counts) > 1 else list(cfg.counts)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for i, replicas in enumerate(runs):
            config = with_replicas(cfg.serve_config, replicas, Path(folder))
            label = f"{replicas} replica{'s' if replicas > 1 else ''}" + (
                " (again)" if i >= len(cfg.counts) else ""
            )
            print(f"{label}: starting the service ... (load average {loadavg()})", flush=True)
            with ray_service(cfg.repository, config) as target:
                before = loadavg()
                rows: list[Row] = asyncio.run(_over_grpc(bench, target, workloads))
                after = loadavg()
            results.append({"run": label, "replicas": replicas, "loadavg_before": before,
                            "loadavg_after": after, "rows": [asdict(r) for r in rows]})  # fmt: skip
    print_table(results)
    write_json(
        cfg.out, {"config": jsonable(asdict(cfg)), "cpus": len(os.sched_getaffinity(0)), "runs": results}
    )
    return results


def print_table(results: list[dict]) -> None:
    """req/s (p99 ms, load generator CPU ms per call) per model and concurrency, a column per run,
    and the ratio of the second run to the first."""
    keys = [(r["model"], r["concurrency"]) for r in results[0]["rows"]]
    cells = {(res["run"], r["model"], r["concurrency"]): r for res in results for r in res["rows"]}
    header = f"{'model':<18} {'conc':>4} " + " ".join(f"{res['run']:>30}" for res in results)
    header += "  2nd/1st" if len(results) > 1 else ""
    print("\nreq/s (p99 ms, load generator CPU ms/call), closed loop, one connection\n" + header)
    print("-" * len(header))
    for model, c in keys:
        row = [cells.get((res["run"], model, c)) for res in results]
        text = " ".join(
            f"{r['req_per_s']:>9.1f} ({r['p99_ms'] or 0:>6.1f}, {r['client_cpu_ms'] or 0:>5.2f})      "
            if r else f"{'-':>30}"
            for r in row
        )  # fmt: skip
        ratio = (
            f"  {row[1]['req_per_s'] / row[0]['req_per_s']:.2f}" if len(row) > 1 and row[0] and row[1] else ""
        )
        print(f"{model:<18} {c:>4} {text}{ratio}")
    for res in results:
        print(f"  {res['run']}: load average {res['loadavg_before']} before, {res['loadavg_after']} after")
