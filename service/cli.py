"""The `attnserve` command: serve, translate, caption, batch, models, train, export, eval, bench.

Training and export import torch lazily, so the serving commands work without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_RUN = Path("runs/model")


def _serve(args: argparse.Namespace) -> int:
    from attnserve.service.config import DEFAULT_SERVE_CONFIG, LocalOptions
    from attnserve.service.server import DeployError
    from attnserve.service.supervisor import serve_until_signalled

    options = LocalOptions(
        serve_config=args.serve_config or DEFAULT_SERVE_CONFIG, address=args.address, num_cpus=args.num_cpus,
        metrics_port=args.metrics_port, grpc_port=args.grpc_port, http_port=args.http_port,
        host=args.host, model_repository=args.repository, max_batch_size=args.max_batch_size,
        batch_wait_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        max_queue_wait_s=args.max_queue_wait_s,
    )  # fmt: skip
    try:
        return serve_until_signalled(options)
    except (DeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _call(args: argparse.Namespace, rpc: str, *params):
    """One rpc on the served attnserve; prints the status and returns None if it fails."""
    import grpc

    from attnserve.service.client import Client

    with Client(args.target, timeout_s=args.timeout) as client:
        try:
            return getattr(client, rpc)(*params)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return None


def _plotting_missing(asked: bool) -> bool:
    """True (and says so) if pictures were asked for but the plot extra is not installed."""
    if not asked:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: attention pictures need the plot extra: pip install 'attnserve[plot]'", file=sys.stderr)
        return True
    return False


def _plot(response, path: Path | None, image: bytes | None = None) -> None:
    """Draws a response's attention into a PNG file, if one was asked for."""
    if path is None:
        return
    from attnserve.service.plotting import response_figure, save

    print(f"attention picture: {save(response_figure(response, image), path)}")


def _translate(args: argparse.Namespace) -> int:
    from attnserve.service.client import format_attention

    if _plotting_missing(bool(args.plot)):
        return 2
    response = _call(args, "translate", args.model, args.text, args.attention or bool(args.plot),
                     args.max_output_tokens, args.beam, args.length_penalty, args.locale)  # fmt: skip
    if response is None:
        return 1
    print(response.text)
    _plot(response, args.plot)
    if args.attention:
        print(
            f"\nattention ({response.model} v{response.model_version}): rows = output tokens, "
            "columns = source tokens"
        )
        print(format_attention(response.attention))
    return 0


def _caption(args: argparse.Namespace) -> int:
    from attnserve.service.client import format_attention_maps

    if _plotting_missing(bool(args.plot)):
        return 2
    image = args.image.read_bytes()
    response = _call(args, "caption", args.model, image, args.attention or bool(args.plot),
                     args.max_output_tokens, args.beam, args.length_penalty)  # fmt: skip
    if response is None:
        return 1
    print(response.text)
    _plot(response, args.plot, image)
    if args.attention:
        a = response.attention
        print(
            f"\nattention ({response.model} v{response.model_version}): one {a.grid_height}x{a.grid_width} "
            f"map per word (image resized to {response.input_height}x{response.input_width})"
        )
        print(format_attention_maps(a))
    return 0


def _batch(args: argparse.Namespace) -> int:
    from attnserve.service.batch.job import BatchConfig, run_batch
    from attnserve.service.batch.reader import InputError
    from attnserve.service.config import DEFAULT_SERVE_CONFIG

    if _plotting_missing(args.plot_first > 0):
        return 2
    cfg = BatchConfig(
        model=args.model, input=args.input, output=args.output, repository=args.repository,
        attention=args.attention, format=args.format, address=args.address, actors=args.actors,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        rows_per_batch=args.rows_per_batch, serve_config=args.serve_config or DEFAULT_SERVE_CONFIG,
        num_cpus=args.num_cpus, plot_first=args.plot_first,
    )  # fmt: skip
    try:
        result = run_batch(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{result.rows} rows ({result.errors} errors) in {result.seconds:.1f} s with {result.actors} actors "
        f"(Ray start-up {result.startup_s:.1f} s); {len(result.parts)} part files in {args.output}"
    )
    for path in result.pictures:
        print(f"attention picture: {path}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    response = _call(args, "list_models")
    if response is None:
        return 1
    print(json.dumps(MessageToDict(response), indent=2))
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server (or --service) is SERVING: for container health checks."""
    from grpc_health.v1 import health_pb2

    status = _call(args, "health", args.service)
    if status is None:
        return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(name)
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _train(args: argparse.Namespace) -> int:
    from attnserve.models.registry import task
    from attnserve.models.train import TrainConfig, train

    if args.recipe:
        return _train_recipe(args)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
        threads=args.threads, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, init_from=args.init_from,
    )  # fmt: skip
    given = dict(path=args.data, tokens=args.tokens, vocab_size=args.vocab_size, held_out=args.held_out,
                 image_size=args.image_size)  # fmt: skip
    task_args = {k: v for k, v in given.items() if v is not None}
    if args.task in ("parallel-text", "image-captions") and not args.data:
        print(f"error: --task {args.task} trains on your own data; pass --data FILE.tsv", file=sys.stderr)
        return 2
    try:
        the_task = task(args.task, **task_args)
    except TypeError:
        options = ", ".join(f"--{k.replace('_', '-')}" for k in task_args)
        print(f"error: task {args.task!r} does not take {options}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train(args.out, the_task, args.architecture, dict(args.set), cfg)
    return 0


def _train_recipe(args: argparse.Namespace) -> int:
    """Trains a bundled model with the settings recorded in models/recipes.yaml."""
    from importlib import resources

    import yaml

    from attnserve.models.registry import task
    from attnserve.models.train import TrainConfig, train

    recipes = yaml.safe_load(resources.files("attnserve.models").joinpath("recipes.yaml").read_text("utf-8"))
    if args.recipe not in recipes:
        print(f"error: no recipe {args.recipe!r}; recipes: {', '.join(recipes)}", file=sys.stderr)
        return 2
    recipe = recipes[args.recipe]
    out = args.out if args.out != DEFAULT_RUN else Path("runs") / args.recipe
    task_args = recipe.get("task_args", {})
    the_task = task(recipe["task"], **task_args)
    checkpoint = None
    for stage in recipe["train"]:
        settings = dict(stage)
        stage_args = settings.pop("task_args", None)  # a stage may change how its task draws examples
        stage_task = task(recipe["task"], **{**task_args, **stage_args}) if stage_args else the_task
        cfg = TrainConfig(**settings, init_from=str(checkpoint) if checkpoint else "")
        checkpoint = train(out, stage_task, recipe["architecture"], recipe["model"], cfg)
    return 0


def _key_value(text: str) -> tuple[str, object]:
    """`name=value` with the value parsed as JSON where it is JSON (numbers), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _export(args: argparse.Namespace) -> int:
    from attnserve.export.pipeline import ExportConfig, export_model

    try:
        entry = export_model(
            ExportConfig(
                args.checkpoint,
                args.repository,
                args.name,
                args.version,
                force=args.force,
                eval_limit=args.eval_limit,
            )
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(entry)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnserve.models.registry import task
    from attnserve.service.core.manifest import Manifest
    from attnserve.service.core.onnx_model import OnnxSeq2Seq

    manifest = Manifest.load(args.entry)
    model, the_task = OnnxSeq2Seq(manifest), task(manifest.task, **manifest.raw.get("task_args", {}))
    decoding = f"beam {args.beam}" if args.beam > 1 else "greedy"
    for split in args.split or the_task.eval_splits:
        got = the_task.evaluate_model(
            model, split, manifest.source_vocab, manifest.target_vocab, args.limit, progress=True,
            beam_size=args.beam,
        )  # fmt: skip
        recorded = manifest.metrics.get(split, {})
        print(f"{manifest.name} v{manifest.version} on {split} ({decoding})")
        for key, value in got.items():
            note = f"  (manifest: {recorded[key]:.4f})" if key in recorded else ""
            print(f"  {key} {value:.4f}{note}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.overload:
        from attnserve.bench.overload import OverloadConfig, run_overload

        if args.model and len(args.model) > 1:
            print("error: --overload runs one --model", file=sys.stderr)
            return 2
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

    run_bench(
        BenchConfig(
            models=tuple(args.model or ()), kinds=tuple(args.kind or KINDS), repository=args.repository,
            serve_config=args.serve_config or BenchConfig.serve_config, target=args.target,
            concurrency=tuple(args.concurrency), requests=args.requests, max_seconds=args.max_seconds,
            out=args.out or BenchConfig.out,
        )
    )  # fmt: skip
    return 0


def _render_k8s(args: argparse.Namespace) -> int:
    from attnserve.service.render_k8s import write_all

    for path in write_all(args.root):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="attnserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the service from a Ray Serve config file")
    p.add_argument("--serve-config", type=Path, help="Ray Serve config file (deploy/serve/attnserve.yaml)")
    p.add_argument("--address", help="Ray cluster to deploy onto (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--metrics-port", type=int, default=8080, help="local Ray's Prometheus port (8080)")
    p.add_argument("--repository", type=Path, help="override the model repository of the file")
    p.add_argument("--grpc-port", type=int, help="override the gRPC port of the file")
    p.add_argument("--http-port", type=int, help="override the HTTP proxy port of the file")
    p.add_argument("--host", help="override the HTTP proxy's bind address of the file")
    p.add_argument("--max-batch-size", type=int, help="override batching for every model")
    p.add_argument("--batch-wait-ms", type=float, help="override the batch wait timer for every model")
    p.add_argument("--max-queue-wait-s", type=float, help="override the admitted queue wait for every model")
    p.set_defaults(handler=_serve)

    for name, handler, help_ in (
        ("translate", _translate, "translate text with a served model"),
        ("caption", _caption, "caption a PNG or JPEG image with a served model"),
        ("models", _models, "list the served models"),
        ("health", _health, "grpc.health.v1 check: exit 0 when serving"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--target", default=DEFAULT_ADDRESS, help=f"gRPC address (default {DEFAULT_ADDRESS})")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds before giving up")
        p.set_defaults(handler=handler)
        if name == "translate":
            p.add_argument("text")
            p.add_argument("--locale", default="", help="the text's CLDR locale, e.g. de_DE (date models)")
        elif name == "caption":
            p.add_argument("image", type=Path, help="a PNG or JPEG file")
        if name == "health":
            p.add_argument("--service", default="", help="a model name, or empty for the whole server")
        if name not in ("models", "health"):
            p.add_argument("--model", required=True)
            p.add_argument("--attention", action="store_true", help="print the attention weights")
            p.add_argument("--max-output-tokens", type=int, default=0)
            p.add_argument("--beam", type=int, default=0, help="beam size (0/1 = greedy, up to 16)")
            p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha for beam ranking")
            p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the attention (plot extra)")

    p = sub.add_parser("batch", help="run a model over a file or folder of inputs on Ray Data")
    p.add_argument("--model", required=True)
    p.add_argument("--input", type=Path, required=True, help="JSONL, TSV or Parquet file; a folder of images")
    p.add_argument("--output", type=Path, required=True, help="folder for the part files (new or empty)")
    p.add_argument("--attention", action="store_true", help="write each row's cross attention")
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--actors", type=int, default=0, help="decode actors (default: one per --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=int, default=1, help="CPUs and ONNX Runtime threads per actor")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs per actor (with a GPU serve config); sizes the pool by GPUs")  # fmt: skip
    p.add_argument("--rows-per-batch", type=int, default=256, help="rows an actor takes at a time")
    p.add_argument("--serve-config", type=Path, help="engine settings (deploy/serve/attnserve.yaml)")
    p.add_argument("--plot-first", type=int, default=0, metavar="N",
                   help="attention pictures of the first N rows in OUTPUT/plots (plot extra)")  # fmt: skip
    p.set_defaults(handler=_batch)

    p = sub.add_parser("train", help="train a model family on a task (needs the train extra)")
    p.add_argument(
        "--task", default="g2p", help="g2p, dates, caption; parallel-text or image-captions (your own data)"
    )
    p.add_argument("--data", help="your own data: a TSV of source<TAB>target or image-file<TAB>caption lines")
    p.add_argument("--tokens", choices=("chars", "words", "subwords"), help="parallel-text: how to read text")
    p.add_argument("--vocab-size", type=int, help="parallel-text with subwords: pieces (default 8000)")
    p.add_argument("--held-out", type=int, help="your own data: pairs each for dev and test (default 5%%)")
    p.add_argument("--image-size", type=int, help="image-captions: model input side in pixels (default 56)")
    p.add_argument(
        "--architecture", default="bahdanau-gru", help="bahdanau-gru, luong-gru, transformer, captioner-lstm"
    )
    p.add_argument("--recipe", help="train a bundled model as recorded in models/recipes.yaml")
    p.add_argument("--out", type=Path, default=DEFAULT_RUN, help="default runs/<recipe> for --recipe")
    p.add_argument("--set", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
                   help="a model config field, e.g. --set hidden_size=256 --set score=dot")  # fmt: skip
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps warming up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-examples", type=int, default=0, help="0 = all; small for a smoke run")
    p.add_argument("--max-eval-examples", type=int, default=0, help="0 = whole dev/test splits")
    p.add_argument("--init-from", default="", help="continue from a checkpoint of the same model config")
    p.set_defaults(handler=_train)

    p = sub.add_parser("export", help="export a checkpoint into the model repository")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", default="g2p-bahdanau")
    p.add_argument("--version", default="1")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    p.add_argument(
        "--eval-limit", type=int, default=0, help="evaluate on the first N test examples (0 = all)"
    )
    p.set_defaults(handler=_export)

    p = sub.add_parser("eval", help="evaluate a repository entry through the serving runtime")
    p.add_argument("entry", type=Path, help="e.g. model_repository/g2p-bahdanau/1")
    p.add_argument("--split", action="append", help="dev, test, ... (default: the task's test splits)")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy, what the manifest records)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("bench", help="every model at concurrency 1/8/32: Ray path, plain gRPC, in-process")
    p.add_argument("--model", action="append", help="a model to measure (repeatable; default: every model)")
    p.add_argument("--kind", action="append", choices=("ray", "plain", "in-process"),
                   help="a serving path to measure (repeatable; default: all three)")  # fmt: skip
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--serve-config", type=Path, help="the service and every path's engine settings "
                   "(deploy/serve/attnserve.yaml)")  # fmt: skip
    p.add_argument("--target", help="measure this running service (HOST:PORT) instead of starting Ray")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1000, help="calls per model and concurrency at most")
    p.add_argument("--max-seconds", type=float, default=6.0, help="time per model and concurrency at most")
    p.add_argument("--out", type=Path, help="JSON results (bench/results/bench.json or overload.json)")
    p.add_argument("--overload", action="store_true", help="open-loop arrivals at a multiple of capacity "
                   "instead, on the Ray path (default model en-fr-transformer)")  # fmt: skip
    p.add_argument("--overload-factor", type=float, default=3.0, help="arrival rate / capacity (3)")
    p.add_argument("--overload-seconds", type=float, default=20.0, help="length of the storm (20 s)")
    p.add_argument("--deadline", type=float, default=10.0, help="overload: each call's deadline (10 s)")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("render-k8s", help="regenerate the KubeRay manifests from deploy/serve/*.yaml")
    p.add_argument("--root", type=Path, default=Path("."), help="repository root")
    p.set_defaults(handler=_render_k8s)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `attnserve` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
