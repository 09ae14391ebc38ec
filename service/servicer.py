"""The attnserve.v1 rpcs over a set of engines: proto in, validate, engine, proto out (no Ray).

The Ray Serve deployment (`app.py`) and the plain `grpc.aio` server (`bench/plain_server.py`, the
bench's ceiling) both answer through `Servicer`; they differ only in how a status reaches the
client. Validation runs on the event loop before a request is queued; decoding runs on the
model's engine thread, so a handler never runs model code.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from attnserve.core.engine import Engine
from attnserve.core.errors import ErrorCode, RequestError, invalid
from attnserve.core.requests import PreparedRequest, StreamToken
from attnserve.service.auth import TokenStore
from attnserve.service.grpc_mapping import (
    alignment_from_pb,
    attention_from_pb,
    caption_to_pb,
    model_info_to_pb,
    selection_from_pb,
    translation_to_pb,
)
from attnserve.service.grpc_services import Undecodable
from attnserve.service.model_set import ModelSet
from attnserve.v1 import translator_pb2 as pb

log = logging.getLogger("attnserve")
UNKNOWN_MODEL_TAG = "_unknown"  # never put client-chosen names into metric labels


class RequestRecorder(Protocol):
    """Records one answered rpc (the Ray layer sends it to Prometheus)."""

    def __call__(self, rpc: str, model: str, version: str, code: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """An rpc's answer: the response, or the status and plain message to send instead."""

    response: object | None
    code: ErrorCode | None = None
    message: str = ""


def undecodable(request: Undecodable) -> Outcome:
    """INVALID_ARGUMENT for request bytes that do not parse."""
    message = f"the request body ({request.size} bytes) is not a valid {request.type_name}"
    return Outcome(None, ErrorCode.INVALID_ARGUMENT, message)


Metadata = Iterable[tuple[str, str | bytes]]


class Servicer:
    """Answers Translate, Caption and ListModels for the models whose engines it holds.

    With a TokenStore, every one of those calls must carry a known bearer token; a refused call
    gets UNAUTHENTICATED and `refused(rpc, reason)` is told why (never the token).
    """

    def __init__(
        self,
        models: ModelSet,
        record: RequestRecorder | None = None,
        tokens: TokenStore | None = None,
        refused: Callable[[str, str], None] | None = None,
    ):
        self.models = models
        self.record = record or (lambda *_: None)
        self.tokens = tokens
        self.refused = refused or (lambda *_: None)
        self.serving = True

    def authenticate(self, rpc: str, metadata: Metadata) -> Outcome | None:
        """None if the call may proceed; else the UNAUTHENTICATED outcome to send."""
        if self.tokens is None:
            return None
        verdict = self.tokens.check(metadata)
        if verdict.caller is not None:
            return None
        self.refused(rpc, verdict.reason)
        return Outcome(None, ErrorCode.UNAUTHENTICATED, verdict.message)

    async def translate(
        self, request: pb.TranslateRequest, time_remaining: float | None, metadata: Metadata = ()
    ) -> Outcome:
        """Translate: validate the text, decode it in the model's running batch, map the result."""
        return self.authenticate("Translate", metadata) or await self._decode(
            "Translate", request, time_remaining, _text_request(request), translation_to_pb
        )

    async def caption(
        self, request: pb.CaptionRequest, time_remaining: float | None, metadata: Metadata = ()
    ) -> Outcome:
        """Caption: check and decode the image, decode it in the model's running batch, map the result."""
        return self.authenticate("Caption", metadata) or await self._decode(
            "Caption", request, time_remaining, _image_request(request), caption_to_pb
        )

    def translate_stream(
        self, request: pb.TranslateRequest, time_remaining: float | None, metadata: Metadata = ()
    ) -> AsyncIterator[Outcome]:
        """TranslateStream: a chunk per output token, then one with the whole response."""
        return self._stream(
            "TranslateStream", request, time_remaining, metadata, _text_request(request), translation_to_pb,
            pb.TranslateChunk,
        )  # fmt: skip

    def caption_stream(
        self, request: pb.CaptionRequest, time_remaining: float | None, metadata: Metadata = ()
    ) -> AsyncIterator[Outcome]:
        """CaptionStream: a chunk per output word, then one with the whole response."""
        return self._stream(
            "CaptionStream", request, time_remaining, metadata, _image_request(request), caption_to_pb,
            pb.CaptionChunk,
        )  # fmt: skip

    async def list_models(self, request: pb.ListModelsRequest, metadata: Metadata = ()) -> Outcome:
        """ListModels: every model this replica serves, with its figures and providers."""
        refused = self.authenticate("ListModels", metadata)
        if refused:
            return refused
        if isinstance(request, Undecodable):
            return undecodable(request)

        async def work() -> pb.ListModelsResponse:
            infos = []
            for manifest, state, engine in self.models.states():
                model = engine.runner.model if engine else None
                info = model_info_to_pb(
                    manifest, model.providers if model else (), model.precision if model else ""
                )
                info.state = state
                if state == "READY":
                    info.default_share = self.models.default_share(manifest.name, int(manifest.version))
                infos.append(info)
            return pb.ListModelsResponse(models=infos)

        return await self._answer("ListModels", ["", ""], work)

    def _submit(self, request, prepare, time_remaining: float | None, tags: list[str], on_token=None):
        """Routes a call to its model version, validates and submits it; `tags` become that
        version's metric labels. Returns (engine, future).

        Raises:
            RequestError: NOT_FOUND for an unknown model or version, UNAVAILABLE while shutting
                down, and whatever validation or admission refuses.
        """
        if not self.serving:
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down; retry")

        def tagged(engine: Engine) -> PreparedRequest:
            tags[:] = [engine.runner.manifest.name, engine.runner.manifest.version]
            return prepare(engine)

        return self.models.submit(request.model, request.version, tagged, _deadline(time_remaining), on_token)

    async def _decode(self, rpc: str, request, time_remaining: float | None, prepare, to_pb) -> Outcome:
        """Validates with `prepare`, submits to the model version's engine, awaits and maps the result."""
        if isinstance(request, Undecodable):
            return undecodable(request)
        tags = [UNKNOWN_MODEL_TAG, ""]

        async def work():
            engine, future = self._submit(request, prepare, time_remaining, tags)
            # wrap_future cancels the engine's future if this call is cancelled: the request
            # is then dropped, queued or decoding.
            return to_pb(await asyncio.wrap_future(future), engine.runner.manifest)

        return await self._answer(rpc, tags, work)

    async def _stream(
        self, rpc: str, request, time_remaining: float | None, metadata: Metadata, prepare, to_pb, chunk
    ) -> AsyncIterator[Outcome]:
        """Like `_decode`, but yields a `chunk` per token as the engine thread chooses it, then a
        chunk with the whole response; a failure is the last outcome. If the client goes away,
        the request leaves the running batch at the next step."""
        refused = self.authenticate(rpc, metadata)
        if refused or isinstance(request, Undecodable):
            yield refused or undecodable(request)
            return
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        future = None

        def on_token(t: StreamToken) -> None:  # on the engine thread
            row = () if t.attention is None else t.attention.tolist()
            message = chunk(token=t.token, text=t.text, attention=row, token_logprob=t.logprob)
            loop.call_soon_threadsafe(tokens.put_nowait, message)

        async def start():
            nonlocal future
            engine, future = self._submit(request, prepare, time_remaining, tags, on_token)
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
            return engine

        tags = [UNKNOWN_MODEL_TAG, ""]
        opened = await self._answer(rpc, tags, start, record_ok=False)
        if opened.code is not None:
            yield opened
            return
        started = time.perf_counter()
        last = None
        try:
            while (message := await tokens.get()) is not None:
                yield Outcome(message)

            async def finish():
                return chunk(response=to_pb(future.result(), opened.response.runner.manifest))

            last = await self._answer(rpc, tags, finish, started=started)
            yield last
        finally:
            if last is None:  # the client went away before the answer
                future.cancel()
                self.record(rpc, *tags, "CANCELLED", time.perf_counter() - started)

    async def _answer(
        self,
        rpc: str,
        tags: list[str],
        work: Callable[[], Awaitable],
        record_ok: bool = True,
        started: float | None = None,
    ) -> Outcome:
        """Runs one rpc (or a step of a streamed one) and records it under `tags` (model, version:
        what `work` routed to by then); every failure becomes a status with a plain message.

        Anything that is not a RequestError is logged with an incident id, and the client gets
        INTERNAL with only that id: no traceback, pid or Ray error text.
        """
        started = time.perf_counter() if started is None else started
        code = "OK"
        try:
            return Outcome(await work())
        except RequestError as e:
            code = e.code.name
            return Outcome(None, e.code, e.message)
        except asyncio.CancelledError:  # the client went away; the engine dropped its request
            code = "CANCELLED"
            raise
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", incident, rpc)
            code = ErrorCode.INTERNAL.name
            return Outcome(None, ErrorCode.INTERNAL, f"internal error (incident {incident})")
        finally:
            if code != "OK" or record_ok:
                self.record(rpc, *tags, code, time.perf_counter() - started)


def _deadline(time_remaining: float | None) -> float | None:
    """The time.monotonic() deadline of a call with `time_remaining` seconds left."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def _text_request(request: pb.TranslateRequest) -> Callable[[Engine], PreparedRequest]:
    """Validates a TranslateRequest for an engine's model."""

    def prepare(engine: Engine) -> PreparedRequest:
        o = request.options
        return engine.runner.codec.prepare(
            request.text, attention_from_pb(o.attention), o.max_output_tokens, o.beam_size,
            o.length_penalty, request.locale, scores=o.return_scores, num_hypotheses=o.num_hypotheses,
            alignment=alignment_from_pb(o.alignment), alignment_threshold=o.alignment_threshold,
            selection=selection_from_pb(o),
        )  # fmt: skip

    return prepare


def _image_request(request: pb.CaptionRequest) -> Callable[[Engine], PreparedRequest]:
    """Validates a CaptionRequest for an engine's model."""

    def prepare(engine: Engine) -> PreparedRequest:
        o = request.options
        if o.num_hypotheses > 1 or o.alignment:
            raise invalid("num_hypotheses and alignment are Translate options; Caption returns one caption")
        return engine.runner.codec.prepare_image(
            request.image, attention_from_pb(o.attention), o.max_output_tokens, o.beam_size,
            o.length_penalty, scores=o.return_scores,
        )  # fmt: skip

    return prepare
