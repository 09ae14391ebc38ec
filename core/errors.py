"""Errors that belong to one request; the gRPC layer maps each code to a status."""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    """Subset of gRPC status codes the domain can produce (names match grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class RequestError(Exception):
    """A request failed; `message` is safe to show the client (no internals)."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):
        return (RequestError, (self.code, self.message))


def invalid(message: str) -> RequestError:
    """An INVALID_ARGUMENT error."""
    return RequestError(ErrorCode.INVALID_ARGUMENT, message)
