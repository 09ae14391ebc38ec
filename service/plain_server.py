"""A plain `grpc.aio` server over the same engines and servicer, without Ray.

It is the Python serving ceiling the bench compares the Ray Serve path against, and a way to
serve one host without a Ray cluster.
"""

from __future__ import annotations

import asyncio

import grpc

from attnserve.service.auth import TokenStore
from attnserve.service.core.engine import Engine
from attnserve.service.grpc_services import add_translator_to_server
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
    add_translator_to_server(PlainTranslator(Servicer(engines, tokens=tokens)), server)
    if tls:
        server.add_secure_port(address, server_credentials(tls))
    else:
        server.add_insecure_port(address)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop(5)
