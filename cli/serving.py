"""Serving and client commands: serve, translate, caption, models, health, batch.

They need neither torch nor the train extra; each handler imports what it uses when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


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
        max_queue_wait_s=args.max_queue_wait_s, poll_repository_s=args.poll_repository,
        autoscale=args.autoscale,
    )  # fmt: skip
    try:
        _secure_environment(args)
        return serve_until_signalled(options)
    except (DeployError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def replica_range(text: str) -> tuple[int, int]:
    """`--autoscale MIN:MAX`: whole numbers, 1 <= MIN <= MAX.

    Raises:
        argparse.ArgumentTypeError: with a plain message, which argparse prints.
    """
    low, sep, high = text.partition(":")
    try:
        bounds = (int(low), int(high)) if sep else None
    except ValueError:
        bounds = None
    if bounds is None:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, two whole numbers such as 1:4, not {text!r}")
    if bounds[0] < 1:
        raise argparse.ArgumentTypeError(f"MIN must be at least 1 (no scale to zero), not {bounds[0]}")
    if bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"MAX ({bounds[1]}) must be at least MIN ({bounds[0]})")
    return bounds


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


def _call(args: argparse.Namespace, rpc: str, *params, **keywords):
    """One rpc on the served attnserve; prints the status and returns None if it fails."""
    import grpc

    client = _client(args)
    if client is None:
        return None
    with client:
        try:
            return getattr(client, rpc)(*params, **keywords)
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
                                         args.beam, args.length_penalty, args.locale, version=args.version,
                                         **_answer_options(args))  # fmt: skip
        try:
            for chunk in stream:
                if chunk.HasField("response"):
                    print()
                    _print_answer(args, chunk.response, text=args.tokens or args.attention)
                elif args.attention or args.tokens:  # one line per token
                    weights = " ".join(f"{w:.2f}" for w in chunk.attention)
                    logprob = f"\t{chunk.token_logprob:.3f}" if chunk.HasField("token_logprob") else ""
                    print(f"{chunk.token}{logprob}\t{weights}".rstrip(), flush=True)
                else:
                    print(chunk.text, end="", flush=True)  # the text as it arrives
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
                     args.max_output_tokens, args.beam, args.length_penalty, args.locale,
                     version=args.version, **_answer_options(args))  # fmt: skip
    if response is None:
        return 1
    _print_answer(args, response)
    _plot(response, args.plot)
    if args.attention:
        print(
            f"\nattention ({response.model} v{response.model_version}): rows = output tokens, "
            "columns = source tokens"
        )
        print(format_attention(response.attention))
    return 0


def _answer_options(args: argparse.Namespace) -> dict:
    """The client keywords for --scores, --nbest and --align."""
    from attnserve.v1 import translator_pb2 as pb

    align = {"": pb.ALIGNMENT_MODE_NONE, "hard": pb.ALIGNMENT_MODE_HARD, "soft": pb.ALIGNMENT_MODE_SOFT}
    return dict(scores=args.scores, num_hypotheses=args.nbest, alignment=align[args.align or ""])


def _print_answer(args: argparse.Namespace, response, text: bool = True) -> None:
    """The text (unless already streamed), then the scores, n-best list and alignment asked for."""
    if text:
        print(response.text)
    if response.HasField("score"):
        line = f"score {response.score:.4f}"
        if response.HasField("normalized_score"):
            line += f", normalized {response.normalized_score:.4f}"
        print(line)
        print("token log-probs: " + " ".join(
            f"{t}:{p:.3f}" for t, p in zip(response.output_tokens, response.token_logprobs, strict=True)
        ))  # fmt: skip
    for i, h in enumerate(response.hypotheses, start=1):
        print(f"{i}. {h.score:9.4f}  {h.text}")
    if response.alignment:
        print(f"alignment (source-output tokens): {response.alignment}")
    if response.word_alignment:
        print(f"alignment (source-output words): {response.word_alignment}")


def _caption(args: argparse.Namespace) -> int:
    from attnserve.service.client import format_attention_maps

    if _plotting_missing(bool(args.plot)):
        return 2
    image = args.image.read_bytes()
    response = _call(args, "caption", args.model, image, args.attention or bool(args.plot),
                     args.max_output_tokens, args.beam, args.length_penalty,
                     version=args.version)  # fmt: skip
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
        attention=args.attention, scores=args.scores, format=args.format, address=args.address,
        actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
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
    """Prints ListModels as JSON: a ModelInfo per loaded version, with its state and default share."""
    from google.protobuf.json_format import MessageToDict

    from attnserve.v1 import translator_pb2 as pb

    response = _call(args, "list_models")
    if response is None:
        return 1
    # Every field, zeros included (a version that takes no version-less calls shows defaultShare 0),
    # in the .proto's order.
    listed = MessageToDict(response, always_print_fields_with_no_presence=True)
    order = [f.json_name for f in pb.ModelInfo.DESCRIPTOR.fields]
    listed["models"] = [{k: m[k] for k in order if k in m} for m in listed.get("models", [])]
    print(json.dumps(listed, indent=2))
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


def _add_client_security(p: argparse.ArgumentParser) -> None:
    """TLS and token options of a client command."""
    p.add_argument("--tls-ca", type=Path, help="connect over TLS, trusting this PEM CA")
    p.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's PEM certificate")
    p.add_argument("--tls-key", type=Path, help="mutual TLS: this client's PEM private key")
    p.add_argument("--tls-server-name", help="the name to expect in the server's certificate "
                   "(default: the target's host)")  # fmt: skip
    p.add_argument("--token", help="bearer token to send (default $ATTNSERVE_TOKEN)")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds serve, translate, caption, models, health and batch to the `attnserve` subparsers."""
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
    p.add_argument("--poll-repository", type=float, metavar="SECONDS", help="watch the model repository "
                   "every SECONDS for versions added or removed (0: off)")  # fmt: skip
    p.add_argument("--autoscale", type=replica_range, metavar="MIN:MAX", help="autoscale every "
                   "application between MIN and MAX replicas (over the file's replica sizing)")  # fmt: skip
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
            p.add_argument("--stream", action="store_true", help="print the text as it is decoded")
            p.add_argument("--tokens", action="store_true", help="with --stream: one output token per line")
            p.add_argument("--scores", action="store_true", help="print the score and each token's log-prob")
            p.add_argument(
                "--nbest",
                type=int,
                default=0,
                metavar="N",
                help="print the N best hypotheses (needs --beam N or more)",
            )
            p.add_argument("--align", choices=("hard", "soft"), help="print the alignment of output and "
                           "source tokens (and words)")  # fmt: skip
        elif name == "caption":
            p.add_argument("image", type=Path, help="a PNG or JPEG file")
        if name == "health":
            p.add_argument("--service", default="", help="a model name, or empty for the whole server")
        if name not in ("models", "health"):
            p.add_argument("--model", required=True)
            p.add_argument("--version", default="", help="a loaded version of the model, e.g. 2 "
                           "(default: the model's default version)")  # fmt: skip
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
    p.add_argument("--scores", action="store_true", help="write each row's score and token log-probabilities")
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
