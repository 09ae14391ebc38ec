"""`attnserve batch`: read -> validate and decode in an actor pool of engines -> write, on Ray Data.

The decode stage is `map_batches` with the `DecodeActor` class: an actor pool sized to the CPUs it may
use (`cpus_per_actor` CPUs and as many ONNX Runtime threads each), every actor holding the same
engine and runtime the online service builds from the serve config. Ray Data streams blocks
through the stages with backpressure, so memory stays bounded whatever the input's size, and shows
its progress bars. A local Ray is started unless an address (or $RAY_ADDRESS) names a cluster.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from attnserve.core.manifest import Manifest, discover
from attnserve.service.batch.decode_actor import DecodeActor, DecodeActorConfig, offline
from attnserve.service.batch.reader import IO_TASK, InputError, input_format, read_inputs
from attnserve.service.config import DEFAULT_SERVE_CONFIG, AppArgs, app_args

log = logging.getLogger(__name__)
OUTPUT_FORMATS = ("jsonl", "parquet")
ROWS_PER_PART = 10_000  # output rows a part file gathers at least (the last one may have fewer)


@dataclass(frozen=True)
class BatchConfig:
    """One batch job.

    actors: decode actors; 0 for one per `cpus_per_actor` CPUs (or `gpus_per_actor` GPUs) of the
        cluster.
    gpus_per_actor: GPUs each actor reserves (0: CPU only); give a serve config whose runtime asks
        for CUDAExecutionProvider (deploy/serve/attnserve-gpu.yaml).
    rows_per_batch: rows an actor takes from Ray Data at a time (the engine batches them further,
        by the model's max_batch_size in the serve config).
    serve_config: where the engine and runtime settings come from (as `attnserve serve`).
    address: a Ray cluster; None for $RAY_ADDRESS or else a new local Ray.
    """

    model: str
    input: Path
    output: Path
    repository: Path = Path("model_repository")
    attention: bool = False
    scores: bool = False  # each row's score and token log-probabilities
    format: str = "jsonl"
    address: str | None = None
    actors: int = 0
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    rows_per_batch: int = 256
    serve_config: Path = DEFAULT_SERVE_CONFIG
    num_cpus: int | None = None  # a local Ray's CPUs (default: all)
    plot_first: int = 0  # attention pictures of the first N rows, in OUTPUT/plots/


@dataclass(frozen=True)
class BatchResult:
    """What a job did: rows written, of them errors, Ray's start-up and the whole run's seconds."""

    rows: int
    errors: int
    startup_s: float
    seconds: float
    actors: int
    parts: tuple[Path, ...]
    pictures: tuple[Path, ...] = ()


def find_model(repository: Path, name: str) -> Manifest:
    """The latest version of a model in the repository.

    Raises:
        InputError: if there is no such model.
    """
    manifests = {m.name: m for m in discover(repository)}
    if name not in manifests:
        raise InputError(f"no model {name!r} in {repository}; models: {', '.join(manifests)}")
    return manifests[name]


def actor_config(cfg: BatchConfig, manifest: Manifest) -> DecodeActorConfig:
    """The serve config's runtime and engine settings for the model, with the actor's threads."""
    if cfg.serve_config.is_file():
        args = app_args(cfg.serve_config)
    else:
        log.warning("no serve config at %s; using the default engine settings", cfg.serve_config)
        args = AppArgs()
    runtime = args.runtime.runtime_config(intra_op_threads=cfg.cpus_per_actor)
    engine = offline(args.serving.engine_config(manifest.name), cfg.rows_per_batch)
    return DecodeActorConfig(str(manifest.path.resolve()), runtime, engine, cfg.attention, cfg.scores)


def start_ray(address: str | None, num_cpus: int | None) -> float:
    """Joins a cluster, or starts a local Ray; returns the seconds it took."""
    started = time.monotonic()
    address = address or os.environ.get("RAY_ADDRESS")
    init_args: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        init_args["num_cpus"] = num_cpus
    # "local": a new Ray even when `ray start` ran on this machine (as `attnserve serve`).
    ray.init(address=address or "local", **init_args)
    return time.monotonic() - started


def decoded(cfg: BatchConfig, manifest: Manifest, actors: int, actor: type = DecodeActor) -> ray.data.Dataset:
    """The job's dataset up to the decode stage (nothing runs until it is consumed); `actor` is
    the actor class (the bench times batches with a subclass).

    Raises:
        InputError: if the input cannot be the model's input.
    """
    images = manifest.image is not None
    inputs = read_inputs(cfg.input, input_format(cfg.input, images), images)
    return inputs.map_batches(
        actor,
        fn_constructor_kwargs={"config": actor_config(cfg, manifest)},
        batch_size=cfg.rows_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )


def pool_size(cfg: BatchConfig) -> int:
    """Decode actors: as configured, else one per `gpus_per_actor` of the cluster's GPUs when
    actors use GPUs, else one per `cpus_per_actor` of its CPUs."""
    if cfg.actors:
        return cfg.actors
    resources = ray.cluster_resources()
    if cfg.gpus_per_actor:
        return max(int(resources.get("GPU", 0) // cfg.gpus_per_actor), 1)
    return max(int(resources.get("CPU", 1) // cfg.cpus_per_actor), 1)


def run_batch(cfg: BatchConfig) -> BatchResult:
    """Runs a job to the end and writes its part files into `cfg.output`.

    Raises:
        InputError: for an unknown model, unreadable input, or an output folder that is not empty.
    """
    if cfg.format not in OUTPUT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(OUTPUT_FORMATS)}")
    if cfg.output.exists() and any(cfg.output.iterdir()):
        raise InputError(f"output folder {cfg.output} is not empty")
    manifest = find_model(cfg.repository, cfg.model)
    input_format(cfg.input, manifest.image is not None)  # fail before Ray starts
    started = time.monotonic()
    startup = start_ray(cfg.address, cfg.num_cpus) if not ray.is_initialized() else 0.0
    actors = pool_size(cfg)
    dataset = decoded(cfg, manifest, actors)
    out = str(cfg.output.resolve())
    write = {"min_rows_per_file": ROWS_PER_PART, "concurrency": IO_TASK["concurrency"],
             "ray_remote_args": {"num_cpus": IO_TASK["num_cpus"]}}  # fmt: skip
    if cfg.format == "parquet":
        dataset.write_parquet(out, **write)
    else:
        dataset.write_json(out, force_ascii=False, **write)  # JSON lines, UTF-8
    parts = tuple(sorted(p for p in cfg.output.iterdir() if p.is_file()))
    rows, errors = count_rows(parts, cfg.format)
    seconds = time.monotonic() - started
    pictures = ()
    if cfg.plot_first:
        from attnserve.service.batch.pictures import plot_first

        pictures = tuple(plot_first(manifest, cfg.input, cfg.plot_first, cfg.output / "plots"))
    return BatchResult(rows, errors, startup, seconds, actors, parts, pictures)


def count_rows(parts: tuple[Path, ...], fmt: str) -> tuple[int, int]:
    """Rows in a job's part files, and how many of them are errors."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    files = [str(p) for p in parts]
    table = pds.dataset(files, format="parquet" if fmt == "parquet" else "json").to_table(columns=["error"])
    return table.num_rows, pc.sum(pc.is_valid(table.column("error"))).as_py() or 0
