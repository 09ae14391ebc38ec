"""Registers the served gRPC services with request parsing that never fails the transport.

grpcio parses request bytes before any servicer code runs, and a parse failure reaches the
client as UNKNOWN with Python's exception text. These `add_*_to_server` functions register the
generated handlers with a parser that hands undecodable bytes to the servicer as `Undecodable`,
so it can answer INVALID_ARGUMENT with a plain message. They are what the serve config lists in
`grpc_servicer_functions`, and the plain server uses them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc

from attnserve.v1 import translator_pb2_grpc

# The caller's deadline in milliseconds, sent by the SDK beside gRPC's own: Ray Serve does not
# hand gRPC's deadline to the replica.
TIMEOUT_METADATA = "attnserve-timeout-ms"


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not a valid message of the rpc's request type."""

    type_name: str
    size: int


def _tolerant(parse: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    """A request deserializer that returns Undecodable instead of raising."""

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except (DecodeError, ValueError, RuntimeError):
            return Undecodable(type_name, len(data))

    return deserialize


class _Capture:
    """Stands in for a server to collect what a generated add_*_to_server registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def _add_tolerant(add_generated: Callable, servicer, server) -> None:
    """Registers the generated handlers of one service with tolerant request parsing."""
    capture = _Capture()
    add_generated(servicer, capture)
    handlers = {
        name: h._replace(
            request_deserializer=_tolerant(h.request_deserializer, f"{capture.service}/{name} request")
        )
        for name, h in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


def add_translator_to_server(servicer, server) -> None:
    """attnserve.v1.Translator."""
    _add_tolerant(translator_pb2_grpc.add_TranslatorServicer_to_server, servicer, server)


def add_health_to_server(servicer, server) -> None:
    """grpc.health.v1.Health (Check, Watch)."""
    _add_tolerant(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)
