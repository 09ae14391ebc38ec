"""The bench's baseline: a plain `grpc.aio` server over the same engines and servicer, without Ray.

    python -m attnserve.bench.plain_server --repository model_repository --address 127.0.0.1:50099

It is the Python serving ceiling the bench compares the Ray Serve path against: it serves the
models with the engine settings of the serve config file (per-model batching and admission,
ONNX Runtime settings), so it differs from the Ray path only in what carries the calls.
$ATTNSERVE_TLS_* and $ATTNSERVE_AUTH_TOKENS secure it as they secure `attnserve serve`.
SIGTERM or SIGINT stops it. It is not a serving mode: it has no health service, metrics or
drain beyond a 5 s grace; serve with `attnserve serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

from attnserve.core.engine import Engine, start_engine
from attnserve.core.manifest import discover
from attnserve.service.auth import TokenStore, token_store_from_env
from attnserve.service.config import DEFAULT_SERVE_CONFIG, app_args
from attnserve.service.grpc_services import add_translator_to_server
from attnserve.service.model_set import ModelSet
from attnserve.service.servicer import Outcome, Servicer
from attnserve.service.tls import ServerTls, server_credentials
from attnserve.v1 import translator_pb2_grpc as pb_grpc


class PlainTranslator(pb_grpc.TranslatorServicer):
    """attnserve.v1.Translator on grpc.aio: the Servicer's outcome, or an abort with its status."""

    def __init__(self, servicer: Servicer):
        self.servicer = servicer

    async def Translate(self, request, context: grpc.aio.ServicerContext):
        outcome = await self.servicer.translate(
            request, context.time_remaining(), context.invocation_metadata()
        )
        return await _reply(outcome, context)

    async def Caption(self, request, context: grpc.aio.ServicerContext):
        outcome = await self.servicer.caption(
            request, context.time_remaining(), context.invocation_metadata()
        )
        return await _reply(outcome, context)

    async def TranslateStream(self, request, context: grpc.aio.ServicerContext):
        metadata = context.invocation_metadata()
        async for outcome in self.servicer.translate_stream(request, context.time_remaining(), metadata):
            yield await _reply(outcome, context)

    async def CaptionStream(self, request, context: grpc.aio.ServicerContext):
        metadata = context.invocation_metadata()
        async for outcome in self.servicer.caption_stream(request, context.time_remaining(), metadata):
            yield await _reply(outcome, context)

    async def ListModels(self, request, context: grpc.aio.ServicerContext):
        return await _reply(await self.servicer.list_models(request, context.invocation_metadata()), context)


async def _reply(outcome: Outcome, context: grpc.aio.ServicerContext):
    """The response, or an abort with the outcome's status and plain message."""
    if outcome.code is not None:
        await context.abort(grpc.StatusCode[outcome.code.name], outcome.message)
    return outcome.response


async def serve_plain(
    engines: dict[str, Engine],
    address: str,
    stop: asyncio.Event,
    tls: ServerTls | None = None,
    tokens: TokenStore | None = None,
) -> None:
    """Serves the engines on `address` until `stop` is set, then drains for up to 5 s.

    With tls, the port speaks only TLS (and mutual TLS with a client CA); with tokens, every
    Translator call needs one. Renewed certificate or token files apply without a restart.
    """
    server = grpc.aio.server()
    add_translator_to_server(PlainTranslator(Servicer(ModelSet.of(engines), tokens=tokens)), server)
    if tls:
        server.add_secure_port(address, server_credentials(tls))
    else:
        server.add_insecure_port(address)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop(5)


def engines_for(serve_config: Path, repository: Path, names: list[str] | None = None) -> dict[str, Engine]:
    """Engines for the models (all, or `names`) with the serve config's runtime and per-model settings.

    Args:
        serve_config: the Ray Serve config file whose engine settings to use.
        repository: the model repository.
        names: the models to load; None for every model.

    Returns:
        Engine per model name, each running on its own thread.
    """
    args = app_args(serve_config, repository)
    runtime = args.runtime.runtime_config()
    return {
        m.name: start_engine(m, runtime, args.serving.engine_config(m.name))
        for m in discover(repository)
        if names is None or m.name in names
    }


async def _serve(engines: dict[str, Engine], address: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls, tokens = ServerTls.from_env(), token_store_from_env()  # as `attnserve serve` takes them
    print(f"plain server on {address}{' (TLS)' if tls else ''}: {', '.join(sorted(engines))}", flush=True)
    await serve_plain(engines, address, stop, tls, tokens)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, load the engines, serve until signalled."""
    parser = argparse.ArgumentParser(prog="python -m attnserve.bench.plain_server", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--address", default="127.0.0.1:50052")
    parser.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG)
    parser.add_argument("--model", action="append", help="serve only these models (repeatable)")
    args = parser.parse_args(argv)
    engines = engines_for(args.serve_config, args.repository, args.model)
    try:
        asyncio.run(_serve(engines, args.address))
    finally:
        for engine in engines.values():
            engine.close(timeout_s=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
