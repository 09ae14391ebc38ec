"""`make bench-batch`: `attnserve batch` on Ray Data against the in-process engine, every bundled model.

    python -m attnserve.bench.batch [--model NAME ...] [--seconds 40] [--out bench/results/batch.json]

For each model the same real held-out inputs (bench/inputs.py, repeated to size) are decoded with
cross attention (a) by an Engine called in this process with every CPU as ONNX Runtime threads,
and (b) by the batch job's pipeline (read -> validate -> decode actors) on a local Ray, with 1 actor
x all CPUs and with one actor per CPU. Rows per model are sized from a short engine probe so each
run takes about `--seconds`. The job's rows/s is its steady state: the rows after an actor decoded
its first batch, over the time from then until the driver had the last row; Ray's start-up and the
pipeline's (actors loading the model, first batch) are reported apart. Writing part files is left
out (the driver consumes the decoded batches). Peak memory is the summed RSS of this process and
every process of its local Ray (the object store's shared pages count once per process mapping them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import ray

from attnserve.bench.inputs import Sample, load_workload
from attnserve.bench.run import write_json
from attnserve.bench.servers import busy_seconds
from attnserve.core.engine import start_engine
from attnserve.core.manifest import Manifest, discover
from attnserve.core.requests import AttentionMode
from attnserve.service.batch.decode_actor import DecodeActor, decode_rows
from attnserve.service.batch.job import BatchConfig, actor_config, decoded, start_ray
from attnserve.service.batch.rows import input_row

# The scale the issue asks for; `--seconds` caps each run below it on a small machine.
FULL_ROWS = {"g2p": 50_000, "dates": 50_000, "parallel-text": 62_000, "caption": 10_000}
PROBE_ROWS = 300
MIN_ROWS = 1_000


@dataclass(frozen=True)
class Row:
    """One model measured: the engine in-process, then the batch job with 1 and with N actors."""

    model: str
    rows: int
    engine_rows_s: float
    engine_peak_gib: float
    actors: int
    threads_per_actor: int
    batch_rows_s: float
    end_to_end_rows_s: float
    pipeline_startup_s: float
    batch_peak_gib: float
    other_cores: float  # CPU cores busy with anything else meanwhile (should be ~0)

    @property
    def ratio(self) -> float:
        return self.batch_rows_s / self.engine_rows_s


class TreeMonitor:
    """Samples this process and its descendants (a local Ray, actors that come and go) until
    stopped: peak summed RSS, their CPU seconds, and the CPU the rest of the machine spent."""

    def __init__(self, every_s: float = 0.2):
        self.peak, self._stop, self._cpu, self._base = 0, threading.Event(), {}, {}
        self._busy, self._started = busy_seconds(), time.perf_counter()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        me, total = psutil.Process(), 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
                t = p.cpu_times()
                self._cpu[p.pid] = t.user + t.system + t.children_user + t.children_system
                if first:
                    self._base[p.pid] = self._cpu[p.pid]
        self.peak = max(self.peak, total)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self._sample()

    def stop(self) -> tuple[float, float]:
        """(peak GiB, cores the rest of the machine kept busy on average)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        mine = sum(cpu - self._base.get(pid, 0.0) for pid, cpu in self._cpu.items())
        other = busy_seconds() - self._busy - mine
        return self.peak / 2**30, max(other, 0.0) / (time.perf_counter() - self._started)


class TimedDecodeActor(DecodeActor):
    """The job's decode actor, adding when each batch was decoded (epoch seconds)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        return out.append_column("decoded_at", pa.array([time.time()] * out.num_rows, pa.float64()))


def _cycle(samples: tuple[Sample, ...], count: int) -> list[Sample]:
    return [samples[i % len(samples)] for i in range(count)]


def engine_rows_s(
    manifest: Manifest, samples: list[Sample], threads: int, cfg: BatchConfig
) -> tuple[float, float]:
    """Rows/s (validation included) and peak GiB of an in-process Engine with the job's settings."""
    dc = actor_config(cfg, manifest)
    runtime = replace(dc.runtime, intra_op_threads=threads)
    engine = start_engine(manifest, runtime, dc.engine)
    rows = [input_row(str(i), s.text, s.locale, s.image or None) for i, s in enumerate(samples)]
    list(decode_rows(engine, rows[:32], AttentionMode.CROSS))  # warm-up
    monitor = TreeMonitor()
    started = time.perf_counter()
    for i in range(0, len(rows), cfg.rows_per_batch):  # as an actor does: a batch of rows at a time
        list(decode_rows(engine, rows[i : i + cfg.rows_per_batch], AttentionMode.CROSS))
    seconds = time.perf_counter() - started
    engine.close()
    return len(rows) / seconds, monitor.stop()[0]


def write_input(samples: list[Sample], folder: Path) -> Path:
    """The samples as the job's input: JSONL rows, or a folder of PNG files."""
    if samples[0].image:
        images = folder / "images"
        images.mkdir()
        for i, s in enumerate(samples):
            (images / f"{i:06d}.png").write_bytes(s.image)
        return images
    path = folder / "rows.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"text": s.text, "locale": s.locale}, ensure_ascii=False) + "\n")
    return path


def batch_rows_s(
    cfg: BatchConfig, manifest: Manifest, actors: int
) -> tuple[float, float, float, float, float]:
    """(steady rows/s, end-to-end rows/s, pipeline start-up s, peak GiB, other cores) of one job.

    Start-up ends when an actor has decoded its first batch (the actors' clocks: the driver may get
    batches later, from the object store); steady state is every later row over the time from
    then until the driver has the last one, so a consumer slower than the actors counts.
    """
    dataset = decoded(cfg, manifest, actors, TimedDecodeActor)
    monitor, started = TreeMonitor(), time.time()
    times = []  # every row's decode time: Ray Data joins several batches' outputs into one block
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        times.append(batch.column("decoded_at").to_numpy())
    ended = time.time()
    peak, other = monitor.stop()
    decoded_at = np.concatenate(times)
    first = decoded_at.min()
    later = int((decoded_at > first).sum())
    return later / (ended - first), len(decoded_at) / (ended - started), first - started, peak, other


def measure(manifest: Manifest, seconds: float, cpus: int, cfg: BatchConfig, work: Path) -> list[Row]:
    """One model: engine probe -> size -> engine -> batch with 1 actor x cpus threads, cpus x 1."""
    workload = load_workload(manifest, count=2000, attention=True)
    probe, _ = engine_rows_s(manifest, _cycle(workload.samples, PROBE_ROWS), cpus, cfg)
    full = FULL_ROWS.get("caption" if manifest.image else manifest.task, 50_000)
    count = int(min(max(probe * seconds, MIN_ROWS), full))
    samples = _cycle(workload.samples, count)
    engine, engine_peak = engine_rows_s(manifest, samples, cpus, cfg)
    source = write_input(samples, Path(tempfile.mkdtemp(dir=work)))
    rows = []
    for actors in sorted({1, cpus}):
        threads = cpus // actors
        job = BatchConfig(
            **(asdict(cfg) | {"model": manifest.name, "input": source, "cpus_per_actor": threads})
        )
        steady, end_to_end, startup, peak, other = batch_rows_s(job, manifest, actors)
        rows.append(
            Row(
                manifest.name,
                count,
                engine,
                engine_peak,
                actors,
                threads,
                steady,
                end_to_end,
                startup,
                peak,
                other,
            )
        )
        print_rows(rows[-1:], header=False)
    return rows


HEADER = (
    f"{'model':<20}{'rows':>7}{'engine r/s':>11}{'actors':>7}{'thr':>4}{'batch r/s':>10}{'ratio':>7}"
    f"{'e2e r/s':>9}{'startup s':>10}{'peak GiB':>9}{'eng GiB':>8}{'other':>6}"
)


def print_rows(rows: list[Row], header: bool = True) -> None:
    """The table (or more of its lines)."""
    if header:
        print(HEADER)
    for r in rows:
        print(
            f"{r.model:<20}{r.rows:>7}{r.engine_rows_s:>11.1f}{r.actors:>7}{r.threads_per_actor:>4}"
            f"{r.batch_rows_s:>10.1f}{r.ratio:>7.2f}{r.end_to_end_rows_s:>9.1f}{r.pipeline_startup_s:>10.1f}"
            f"{r.batch_peak_gib:>9.2f}{r.engine_peak_gib:>8.2f}{r.other_cores:>6.2f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Runs the bench; prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m attnserve.bench.batch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", action="append", help="a model (repeatable; default: every bundled model)")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each run (rows sized to it)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpus = len(os.sched_getaffinity(0))
    base = BatchConfig(model="", input=Path(), output=Path(), repository=args.repository, attention=True)
    manifests = [m for m in discover(args.repository) if not args.model or m.name in args.model]
    started = time.perf_counter()
    ray_startup = start_ray(None, cpus)
    print(f"Ray start-up {ray_startup:.1f} s ({cpus} CPUs)\n{HEADER}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as work:
        for manifest in manifests:
            rows += measure(manifest, args.seconds, cpus, base, Path(work))
    ray.shutdown()
    print()
    print_rows(rows)
    print(
        "\nengine r/s: an in-process Engine with all CPUs as ORT threads, rows of the job's batch size;\n"
        "batch r/s: the rows after an actor's first batch over the time until the driver had the last;\n"
        "ratio = batch / engine; e2e: the job from submit to last row (pipeline start-up included);\n"
        "startup s: actors loading the model and the first batch; peak GiB: this process + its local Ray;\n"
        "other: cores busy elsewhere on the machine meanwhile"
    )
    wall = time.perf_counter() - started
    table = [asdict(r) | {"ratio": r.ratio} for r in rows]
    write_json(
        args.out, {"ray_startup_s": ray_startup, "seconds": args.seconds, "wall_s": wall, "rows": table}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
