"""A small synchronous client for attnserve.v1, used by the CLI, the benchmark and the tests.

Calls are retried with exponential backoff by gRPC's standard retry policy on UNAVAILABLE (a
replica restarting or draining) and on a CANCELLED sent by the server, so a replica killed under
load costs a caller no failed call; inference calls are idempotent. Each call carries its deadline
twice: as gRPC's deadline and as `attnserve-timeout-ms` metadata, which the server reads to
refuse work it cannot finish in time (Ray Serve does not hand gRPC's deadline to the replica).
A model served by another application (a model group) is reached with `application` metadata,
which the client finds itself from ListModels. With `tls` the channel is TLS (mutual TLS with a
client certificate); with a token every call carries `authorization: Bearer <token>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attnserve.service.grpc_services import TIMEOUT_METADATA
from attnserve.service.tls import ClientTls
from attnserve.v1 import translator_pb2 as pb
from attnserve.v1 import translator_pb2_grpc as pb_grpc

TOKEN_ENV = "ATTNSERVE_TOKEN"  # the CLI's default --token
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "attnserve.v1.Translator"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    # CANCELLED: gRPC's core in a server cancels new calls at random once more
                    # than 1000 wait for the server to take them (grpc.server.max_pending_requests);
                    # HAProxy keeps attnserve's replicas below that (tls_front.py), but another
                    # server may not. The calls are idempotent, so retrying is safe.
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    }
)


def channel_options() -> list[tuple[str, object]]:
    """Channel options that turn on the retry policy (for any grpcio client of attnserve)."""
    return [("grpc.service_config", RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]


class Client:
    """Wraps a channel to a running attnserve."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout_s: float = 30.0,
        tls: ClientTls | None = None,
        token: str | None = None,
    ):
        """Opens a channel (TLS when `tls` is given); `token` is sent with every call.

        Raises:
            ValueError, OSError: for unusable TLS files.
        """
        options = channel_options()
        if tls is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self.channel = grpc.secure_channel(address, tls.credentials(), options=options)
        self.stub = pb_grpc.TranslatorStub(self.channel)
        self.timeout_s = timeout_s
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self._applications: dict[str, str] | None = None  # model -> application, for groups

    def _metadata(self, model: str = "") -> tuple[tuple[str, str], ...]:
        """The deadline and token metadata, and the model's application when it is in another group."""
        pairs = [(TIMEOUT_METADATA, str(int(self.timeout_s * 1000))), *self._auth]
        app = (self._applications or {}).get(model)
        if app:
            pairs.append(("application", app))
        return tuple(pairs)

    def _call(self, rpc, request, model: str):
        """One call; on NOT_FOUND for the model, looks up its application once and retries there."""
        try:
            return rpc(request, timeout=self.timeout_s, metadata=self._metadata(model))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or self._applications is not None:
                raise
            self._applications = self._find_applications()
            if model not in self._applications:
                raise
            return rpc(request, timeout=self.timeout_s, metadata=self._metadata(model))

    def _find_applications(self) -> dict[str, str]:
        """model -> application, from ListModels of every application Ray Serve lists."""
        from ray.serve.generated import serve_pb2, serve_pb2_grpc

        found: dict[str, str] = {}
        try:
            apps = serve_pb2_grpc.RayServeAPIServiceStub(self.channel).ListApplications(
                serve_pb2.ListApplicationsRequest(), timeout=self.timeout_s
            )
        except grpc.RpcError:
            return found
        for app in apps.application_names:
            try:
                listed = self.stub.ListModels(
                    pb.ListModelsRequest(),
                    timeout=self.timeout_s,
                    metadata=(("application", app), *self._auth),
                )
            except grpc.RpcError:
                continue
            found.update({m.name: app for m in listed.models})
        return found

    def translate(
        self,
        model: str,
        text: str,
        attention: bool = False,
        max_output_tokens: int = 0,
        beam_size: int = 0,
        length_penalty: float = 0.0,
        locale: str = "",
        version: str = "",
        *,
        scores: bool = False,
        num_hypotheses: int = 0,
        alignment: int = pb.ALIGNMENT_MODE_NONE,
    ) -> pb.TranslateResponse:
        """Calls Translate; `version` names a loaded version of the model ("" for its default);
        `scores`, `num_hypotheses` (n-best, at most beam_size) and `alignment` (an AlignmentMode)
        ask for those fields of the response.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """
        request = text_request(
            model, text, attention, max_output_tokens, beam_size, length_penalty, locale, version
        )
        _answer_options(request.options, scores, num_hypotheses, alignment)
        return self._call(self.stub.Translate, request, model)

    def translate_stream(
        self,
        model: str,
        text: str,
        attention: bool = False,
        max_output_tokens: int = 0,
        beam_size: int = 0,
        length_penalty: float = 0.0,
        locale: str = "",
        version: str = "",
        *,
        scores: bool = False,
        num_hypotheses: int = 0,
        alignment: int = pb.ALIGNMENT_MODE_NONE,
    ) -> Iterator[pb.TranslateChunk]:
        """Calls TranslateStream: a chunk per output token as it is decoded (with its attention
        row when `attention` and log-probability when `scores`), the last one carrying the whole
        response. Call `cancel()` on the returned iterator to stop the decoding. The other
        arguments as for `translate`.

        Raises:
            grpc.RpcError: while iterating, with the server's status code and message.
        """
        request = text_request(
            model, text, attention, max_output_tokens, beam_size, length_penalty, locale, version
        )
        _answer_options(request.options, scores, num_hypotheses, alignment)
        return self.stub.TranslateStream(request, timeout=self.timeout_s, metadata=self._metadata(model))

    def caption(
        self,
        model: str,
        image: bytes,
        attention: bool = False,
        max_output_tokens: int = 0,
        beam_size: int = 0,
        length_penalty: float = 0.0,
        version: str = "",
        *,
        scores: bool = False,
    ) -> pb.CaptionResponse:
        """Calls Caption with encoded PNG or JPEG bytes; `version` and `scores` as for `translate`.

        Raises:
            grpc.RpcError: with the server's status code and message.
        """
        request = caption_request(
            model, image, attention, max_output_tokens, beam_size, length_penalty, version
        )
        request.options.return_scores = scores
        return self._call(self.stub.Caption, request, model)

    def list_models(self) -> pb.ListModelsResponse:
        """Calls ListModels."""
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self._metadata())

    def health(self, service: str = "") -> int:
        """grpc.health.v1 Check: the status of the server ("") or a model (a HealthCheckResponse enum).

        Raises:
            grpc.RpcError: NOT_FOUND for an unknown service, or when the server cannot be reached.
        """
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s).status

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def text_request(
    model: str,
    text: str,
    attention: bool = False,
    max_output_tokens: int = 0,
    beam_size: int = 0,
    length_penalty: float = 0.0,
    locale: str = "",
    version: str = "",
) -> pb.TranslateRequest:
    """The TranslateRequest that `Client.translate` and `translate_stream` send."""
    options = _options(attention, max_output_tokens, beam_size, length_penalty)
    return pb.TranslateRequest(model=model, text=text, options=options, locale=locale, version=version)


def caption_request(
    model: str,
    image: bytes,
    attention: bool = False,
    max_output_tokens: int = 0,
    beam_size: int = 0,
    length_penalty: float = 0.0,
    version: str = "",
) -> pb.CaptionRequest:
    """The CaptionRequest that `Client.caption` sends."""
    options = _options(attention, max_output_tokens, beam_size, length_penalty)
    return pb.CaptionRequest(model=model, image=image, options=options, version=version)


def _options(attention: bool, max_output_tokens: int, beam_size: int, length_penalty: float):
    mode = pb.ATTENTION_MODE_CROSS if attention else pb.ATTENTION_MODE_NONE
    return pb.TranslateOptions(
        attention=mode,
        max_output_tokens=max_output_tokens,
        beam_size=beam_size,
        length_penalty=length_penalty,
    )


def _answer_options(options: pb.TranslateOptions, scores: bool, num_hypotheses: int, alignment: int) -> None:
    """Sets the options that ask for scores, an n-best list and an alignment."""
    options.return_scores, options.num_hypotheses, options.alignment = scores, num_hypotheses, alignment


def attention_maps(maps: pb.AttentionMaps) -> np.ndarray:
    """(steps, grid_height, grid_width) float32 array from AttentionMaps."""
    return np.asarray(maps.weights, dtype=np.float32).reshape(maps.steps, maps.grid_height, maps.grid_width)


def format_attention_maps(maps: pb.AttentionMaps) -> str:
    """Each word's map as a grid of weights, its strongest cell marked with *."""
    blocks = []
    for label, grid in zip(maps.labels, attention_maps(maps), strict=True):
        peak = np.unravel_index(grid.argmax(), grid.shape)
        rows = [
            " ".join(f"{w:.2f}" + ("*" if (y, x) == peak else " ") for x, w in enumerate(row))
            for y, row in enumerate(grid)
        ]
        blocks.append(f"{label}:\n  " + "\n  ".join(rows))
    return "\n".join(blocks)


def attention_array(matrix: pb.AttentionMatrix) -> np.ndarray:
    """(rows, cols) float32 array from an AttentionMatrix."""
    return np.asarray(matrix.weights, dtype=np.float32).reshape(matrix.rows, matrix.cols)


def format_attention(matrix: pb.AttentionMatrix) -> str:
    """The matrix as a text table: output tokens down, source tokens across."""
    weights = attention_array(matrix)
    width = max(4, *(len(c) for c in matrix.col_labels))
    label = max(4, *(len(r) for r in matrix.row_labels)) if matrix.row_labels else 4
    lines = [" " * label + " " + " ".join(c.rjust(width) for c in matrix.col_labels)]
    for name, row in zip(matrix.row_labels, weights, strict=True):
        lines.append(name.ljust(label) + " " + " ".join(f"{w:.2f}".rjust(width) for w in row))
    return "\n".join(lines)
