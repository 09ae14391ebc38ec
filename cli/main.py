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


def _secure_environment(args: argparse.Namespace) -> None:
    """Puts the TLS and token options into the environment the service's processes inherit, after
    checking the files (the flags override $ATTNSERVE_TLS_* and $ATTNSERVE_AUTH_TOKENS).

    Raises:
        ValueError: for an unusable certificate, key, CA or token file.
    """
    import os

    from attnserve.service.auth import TOKENS_ENV, TokenStore
    from attnserve.service.tls import CERT_ENV, CLIENT_CA_ENV, HOST_ENV, KEY_ENV, ServerTls

    given = {CERT_ENV: args.tls_cert, KEY_ENV: args.tls_key, CLIENT_CA_ENV: args.tls_client_ca,
             TOKENS_ENV: args.auth_tokens}  # fmt: skip
    os.environ.update({k: str(Path(v).resolve()) for k, v in given.items() if v})
    tls = ServerTls.from_env()
    if tls:
        tls.validate()
        if args.host:
            os.environ[HOST_ENV] = args.host
    if os.environ.get(TOKENS_ENV):
        TokenStore(Path(os.environ[TOKENS_ENV]))


def _serve(args: argparse.Namespace) -> int:
    from attnserve.service.config import DEFAULT_SERVE_CONFIG, LocalOptions
    from attnserve.service.ray_deploy import DeployError
    from attnserve.service.supervisor import serve_until_signalled

    options = LocalOptions(
        serve_config=args.serve_config or DEFAULT_SERVE_CONFIG, address=args.address, num_cpus=args.num_cpus,
        metrics_port=args.metrics_port, grpc_port=args.grpc_port, http_port=args.http_port,
        host=args.host, model_repository=args.repository, max_batch_size=args.max_batch_size,
        batch_wait_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        max_queue_wait_s=args.max_queue_wait_s,
    )  # fmt: skip
    try:
        _secure_environment(args)
        return serve_until_signalled(options)
    except (DeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace):
    """A Client for the CLI's target, TLS and token options; prints why and returns None if it cannot."""
    import os

    from attnserve.service.client import TOKEN_ENV, Client
    from attnserve.service.tls import ClientTls

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTls(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = args.token or os.environ.get(TOKEN_ENV)
    try:
        return Client(args.target, timeout_s=args.timeout, tls=tls, token=token)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _call(args: argparse.Namespace, rpc: str, *params):
    """One rpc on the served attnserve; prints the status and returns None if it fails."""
    import grpc

    client = _client(args)
    if client is None:
        return None
    with client:
        try:
            return getattr(client, rpc)(*params)
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return None


def _translate_stream(args: argparse.Namespace) -> int:
    """Prints each token as it is decoded, then the text."""
    import grpc

    client = _client(args)
    if client is None:
        return 1
    with client:
        stream = client.translate_stream(args.model, args.text, args.attention, args.max_output_tokens,
                                         args.beam, args.length_penalty, args.locale)  # fmt: skip
        try:
            for chunk in stream:
                if chunk.HasField("response"):
                    print(f"\n{chunk.response.text}")
                elif args.attention:
                    weights = " ".join(f"{w:.2f}" for w in chunk.attention)
                    print(f"{chunk.token}\t{weights}", flush=True)
                else:
                    print(chunk.token, end=" ", flush=True)
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


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

    if args.stream:
        return _translate_stream(args)
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
    from attnserve.models.tasks import task
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

    from attnserve.models.tasks import task
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
    from attnserve.core.manifest import ManifestError
    from attnserve.export.from_entry import read_entry
    from attnserve.export.pipeline import ExportConfig, export_model

    if (args.checkpoint is None) == (args.from_entry is None):
        print("error: export takes a checkpoint or --from-entry DIR", file=sys.stderr)
        return 2
    source, name, version, repository = args.checkpoint, args.name, args.version, args.repository
    try:
        if args.from_entry:
            source = args.from_entry
            raw = read_entry(source)
            name, version = name or raw["name"], version or str(raw["version"])
            repository = repository or source.resolve().parent.parent
        entry = export_model(
            ExportConfig(
                source,
                repository or Path("model_repository"),
                name or "g2p-bahdanau",
                version or "1",
                force=args.force,
                eval_limit=args.eval_limit,
                from_entry=bool(args.from_entry),
                int8=not args.no_int8,
            )
        )
    except (FileExistsError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(entry)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from attnserve.export.quantize import add_int8_variant

    variant = add_int8_variant(args.entry, args.eval_limit, progress=True)
    verdict = "qualifies for precision auto" if variant["qualifies"] else "does not qualify for auto"
    print(f"{args.entry}: int8 {variant['metrics']}, quality loss {variant['quality_loss']} ({verdict})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from attnserve.core.manifest import Manifest
    from attnserve.core.onnx_model import OnnxSeq2Seq
    from attnserve.models.tasks import task

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
    if args.step_batching:
        from attnserve.bench.batching import BatchingConfig, run_batching

        models = tuple(args.model or BatchingConfig.models)
        run_batching(
            BatchingConfig(models=models, repository=args.repository, out=args.out or BatchingConfig.out)
        )
        return 0
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

    run, out = run_bench, args.out or BenchConfig.out
    if args.tls:
        from attnserve.bench.tls import run_tls_bench as run

        out = args.out or Path("bench/results/tls.json")
    run(
        BenchConfig(
            models=tuple(args.model or ()), kinds=tuple(args.kind or KINDS), repository=args.repository,
            serve_config=args.serve_config or BenchConfig.serve_config, target=args.target,
            concurrency=tuple(args.concurrency), requests=args.requests, max_seconds=args.max_seconds,
            out=out,
        )
    )  # fmt: skip
    return 0


def _certs(args: argparse.Namespace) -> int:
    from attnserve.service.certs import DEFAULT_NAMES, make_all

    try:
        paths = make_all(args.out, tuple(args.name or DEFAULT_NAMES), args.days)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _render_k8s(args: argparse.Namespace) -> int:
    from attnserve.service.render_k8s import write_all

    for path in write_all(args.root):
        print(path)
    return 0


def _add_client_security(p: argparse.ArgumentParser) -> None:
    """TLS and token options of a client command."""
    p.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting this PEM CA")
    p.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's PEM certificate")
    p.add_argument("--tls-key", type=Path, help="mutual TLS: this client's PEM private key")
    p.add_argument("--tls-server-name", help="the name to expect in the server's certificate "
                   "(default: the target's host)")  # fmt: skip
    p.add_argument("--token", help="bearer token to send (default $ATTNSERVE_TOKEN)")


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
    p.add_argument("--tls-cert", type=Path, help="serve gRPC over TLS with this PEM certificate (chain) "
                   "[$ATTNSERVE_TLS_CERT]")  # fmt: skip
    p.add_argument("--tls-key", type=Path, help="the certificate's PEM private key [$ATTNSERVE_TLS_KEY]")
    p.add_argument("--tls-client-ca", type=Path, help="mutual TLS: clients need a certificate this PEM CA "
                   "signed [$ATTNSERVE_TLS_CLIENT_CA]")  # fmt: skip
    p.add_argument("--auth-tokens", type=Path, help="every call needs a bearer token from this file "
                   "(lines 'name:token'; re-read when it changes) [$ATTNSERVE_AUTH_TOKENS]")  # fmt: skip
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
        _add_client_security(p)
        p.set_defaults(handler=handler)
        if name == "translate":
            p.add_argument("text")
            p.add_argument("--locale", default="", help="the text's CLDR locale, e.g. de_DE (date models)")
            p.add_argument("--stream", action="store_true", help="print each output token as it is decoded")
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
    p.add_argument("checkpoint", type=Path, nargs="?")
    p.add_argument(
        "--from-entry",
        type=Path,
        metavar="DIR",
        help="instead of a checkpoint: re-export the "
        "weights of this repository entry in the current format (default: in place, with --force)",
    )
    p.add_argument("--repository", type=Path, help="default model_repository (--from-entry: the entry's)")
    p.add_argument("--name", help="default g2p-bahdanau (--from-entry: the entry's)")
    p.add_argument("--version", help="default 1 (--from-entry: the entry's)")
    p.add_argument("--force", action="store_true", help="replace an existing entry")
    p.add_argument(
        "--eval-limit", type=int, default=0, help="evaluate on the first N test examples (0 = all)"
    )
    p.add_argument("--no-int8", action="store_true", help="skip the int8 variant (see attnserve quantize)")
    p.set_defaults(handler=_export)

    p = sub.add_parser(
        "quantize", help="add a dynamically quantised int8 variant to an entry, quality measured"
    )
    p.add_argument("entry", type=Path, help="e.g. model_repository/g2p-bahdanau/1")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N examples (0 = all)")
    p.set_defaults(handler=_quantize)

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
    p.add_argument("--step-batching", action="store_true",
                   help="step-level against request-level batching in-process under Poisson load "
                   "(en-fr-transformer, g2p-bahdanau, dates-luong)")  # fmt: skip
    p.add_argument("--tls", action="store_true", help="TLS against plaintext on one Ray service, side by "
                   "side (default model g2p-bahdanau); bench/results/tls.json")  # fmt: skip
    p.add_argument("--overload-factor", type=float, default=3.0, help="arrival rate / capacity (3)")
    p.add_argument("--overload-seconds", type=float, default=20.0, help="length of the storm (20 s)")
    p.add_argument("--deadline", type=float, default=10.0, help="overload: each call's deadline (10 s)")
    p.set_defaults(handler=_bench)

    p = sub.add_parser("certs", help="write a private CA, a server and a client certificate (TLS, mTLS)")
    p.add_argument("--out", type=Path, default=Path("certs"), help="folder to write into (certs/)")
    p.add_argument("--name", action="append", help="a DNS name or IP the server certificate is valid "
                   "for (repeatable; default localhost, 127.0.0.1, attnserve)")  # fmt: skip
    p.add_argument("--days", type=int, default=365, help="validity (365)")
    p.set_defaults(handler=_certs)

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
