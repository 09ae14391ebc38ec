"""The Ray Serve application: one deployment that is the gRPC target and holds the models.

Each replica loads the versions its version policies choose of every model of its application's
group, each into an engine of its own (a thread that owns the ONNX Runtime sessions and batches
whatever is queued), warms them up before it reports ready, and changes that set while serving
when its user_config changes or the repository it polls does (service/model_set.py). Requests
reach the replica straight from the client's connection (Ray's direct ingress behind HAProxy),
are validated on the event loop and handed to the model's engine: one process hop in all.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from attnserve.core.manifest import Manifest, ManifestError
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.quality import answer_quality
from attnserve.service import metrics
from attnserve.service.auth import token_store_from_env
from attnserve.service.config import AppArgs, ServingConfig
from attnserve.service.grpc_services import TIMEOUT_METADATA, Undecodable
from attnserve.service.model_set import ModelSet
from attnserve.service.servicer import Outcome, Servicer, undecodable
from attnserve.v1 import translator_pb2 as pb

log = logging.getLogger("attnserve")
DEPLOYMENT = "attnserve"
SERVICE_NAME = "attnserve.v1.Translator"
GAUGE_PERIOD_S = 5
HEALTH_POLL_S = 0.5
GIL_SWITCH_INTERVAL_S = 0.001  # Python's default is 0.005
# How often a stopping replica counts its calls in flight (Ray's default is 2 s): it stops soon
# after its last call finishes instead of up to 2 s later (scale-down, redeploy).
SHUTDOWN_WAIT_LOOP_S = 0.25


class RayObserver:
    """Records one model's engine events as Ray Serve metrics."""

    def __init__(self, tags: dict[str, str]):
        self.tags = tags

    def rejected(self, reason: str) -> None:
        metrics.rejections().inc(tags={**self.tags, "reason": reason})

    def dropped(self, reason: str) -> None:
        metrics.drops().inc(tags={**self.tags, "reason": reason})

    def step(self, rows: int, waits: list[float], seconds: float, output_tokens: int) -> None:
        wait = metrics.queue_wait()
        for queued in waits:
            wait.observe(queued, tags=self.tags)
        metrics.batch_size().observe(rows, tags=self.tags)
        metrics.decode_latency().observe(seconds, tags=self.tags)
        if output_tokens:
            metrics.output_tokens().inc(output_tokens, tags=self.tags)

    def queue_depth(self, queued: int) -> None:
        metrics.queue_depth().set(queued, tags=self.tags)

    def answered(self, attention: np.ndarray, token_logprobs: np.ndarray | None) -> None:
        quality = answer_quality(attention, token_logprobs)
        if quality is None:  # no output tokens
            return
        metrics.attention_entropy().observe(quality.entropy, tags=self.tags)
        metrics.source_coverage().observe(quality.coverage, tags=self.tags)
        if quality.mean_logprob is not None:
            metrics.token_nll().observe(-quality.mean_logprob, tags=self.tags)


def _record(rpc: str, model: str, version: str, code: str, seconds: float) -> None:
    """Request latency and errors, labelled by rpc and status code."""
    tags = {"model": model, "version": version, "rpc": rpc, "code": code}
    metrics.request_latency().observe(seconds, tags=tags)
    if code != "OK":
        metrics.request_errors().inc(tags=tags)


def _refused(rpc: str, reason: str) -> None:
    """Calls refused for want of a valid token, by reason (missing, malformed, unknown)."""
    metrics.auth_failures().inc(tags={"rpc": rpc, "reason": reason})


@serve.deployment(name=DEPLOYMENT)
class Attnserve:
    """attnserve.v1.Translator and grpc.health.v1.Health for the models of one group."""

    def __init__(self, repository: str, group: tuple[str, ...], runtime: RuntimeConfig, serving: dict):
        # The event loop shares the GIL with the engine threads' Python; a shorter switch
        # interval lets it accept and refuse calls promptly while batches decode.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.repository, self.group = Path(repository), tuple(group)
        self.models = ModelSet(runtime, lambda m: RayObserver({"model": m.name, "version": m.version}))
        self.config = ServingConfig.model_validate(serving)
        self._apply()  # Ray marks the replica ready only once every version is loaded and warm
        # $ATTNSERVE_AUTH_TOKENS reaches the replica through Ray's environment (attnserve serve,
        # the images): every Translator call then needs a token; health checks do not.
        self.servicer = Servicer(self.models, _record, token_store_from_env(), _refused)
        self.draining = False
        threading.Thread(target=self._report_gauges, name="gauges", daemon=True).start()
        threading.Thread(target=self._poll_repository, name="repository-poll", daemon=True).start()

    def _apply(self) -> None:
        """Serves what the version policies choose from the repository now, with the engine
        settings and traffic split of the config (a version that fails to load is logged there)."""
        self.models.weights = self.config.traffic
        self.models.reconcile(self.config.wanted(self.repository, self.group), self.config.engine_config)

    def _poll_repository(self) -> None:
        """Re-reads the repository every poll_repository_s seconds (when set), as Triton's poll mode does."""
        while True:
            period = self.config.poll_repository_s
            time.sleep(period or 1.0)
            if period and not self.draining:
                try:
                    self._apply()
                except Exception:  # a half-written folder or a vanished repository: try again next time
                    log.exception("polling the model repository %s failed", self.repository)

    def _report_gauges(self) -> None:
        """Keeps the gauges exported (Ray drops a gauge not set for ~20 s): providers, queue depth."""
        while True:
            for engine in list(self.models.engines.values()):
                m = engine.runner.manifest
                for provider in engine.runner.model.providers:
                    tags = {"model": m.name, "version": m.version, "provider": provider}
                    metrics.execution_provider().set(1, tags=tags)
                metrics.queue_depth().set(engine.queued, tags={"model": m.name, "version": m.version})
            time.sleep(GAUGE_PERIOD_S)

    def reconfigure(self, user_config: dict) -> None:
        """Applies a ServingConfig without a restart (Ray Serve user_config): engine settings,
        version policies (new versions load and warm up before they take calls) and traffic."""
        self.config = ServingConfig.model_validate(user_config)
        self._apply()

    async def Translate(self, request: pb.TranslateRequest, grpc_context: RayServegRPCContext):
        """Translate one text with the named model."""
        metadata = grpc_context.invocation_metadata()
        outcome = await self.servicer.translate(request, _time_remaining(metadata), metadata)
        return _reply(outcome, grpc_context, pb.TranslateResponse)

    async def Caption(self, request: pb.CaptionRequest, grpc_context: RayServegRPCContext):
        """Caption one image with the named model."""
        metadata = grpc_context.invocation_metadata()
        outcome = await self.servicer.caption(request, _time_remaining(metadata), metadata)
        return _reply(outcome, grpc_context, pb.CaptionResponse)

    async def TranslateStream(self, request: pb.TranslateRequest, grpc_context: RayServegRPCContext):
        """Translate one text, a message per output token as it is decoded."""
        async for chunk in _streamed(self.servicer.translate_stream, request, grpc_context):
            yield chunk

    async def CaptionStream(self, request: pb.CaptionRequest, grpc_context: RayServegRPCContext):
        """Caption one image, a message per output word as it is decoded."""
        async for chunk in _streamed(self.servicer.caption_stream, request, grpc_context):
            yield chunk

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext):
        """The models this application serves."""
        outcome = await self.servicer.list_models(request, grpc_context.invocation_metadata())
        return _reply(outcome, grpc_context, pb.ListModelsResponse)

    def _status(self, service: str) -> int | None:
        """Health of "" (the whole server), the Translator service, or one model (SERVING once a
        version of it is loaded and warm); None if unknown."""
        if service not in ("", SERVICE_NAME) and service not in self.models.loaded():
            return None
        health = health_pb2.HealthCheckResponse
        return health.NOT_SERVING if self.draining else health.SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        """grpc.health.v1.Health/Check: overall ("") or per service / model name."""
        if isinstance(request, Undecodable):
            return _reply(undecodable(request), grpc_context, health_pb2.HealthCheckResponse)
        status = self._status(request.service)
        if status is None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, grpc_context: RayServegRPCContext):
        """grpc.health.v1.Health/List: the status of every service this replica answers for."""
        names = ["", SERVICE_NAME, *sorted(self.models.loaded())]
        statuses = {n: health_pb2.HealthCheckResponse(status=self._status(n)) for n in names}
        return health_pb2.HealthListResponse(statuses=statuses)

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext):
        """grpc.health.v1.Health/Watch: the status now, then every change."""
        service = "" if isinstance(request, Undecodable) else request.service
        last = None
        while True:
            status = self._status(service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_POLL_S)

    async def drain(self, timeout_s: float) -> bool:
        """Turns health NOT_SERVING, refuses new calls with UNAVAILABLE and waits up to timeout_s
        for the accepted ones; True if every accepted call finished."""
        self.draining = True
        self.servicer.serving = False
        self.models.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while self.models.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.models.busy

    def __del__(self):
        """Stops the engine threads when Serve removes the replica.

        No accepted call is cut here: Ray Serve 2.60 runs this last in a replica's graceful
        shutdown (ray/serve/_private/replica.py, `_perform_graceful_shutdown`), after the
        replica is out of routing, its calls in flight (every gRPC call, streams included,
        counts from arrival until its handler returns) have finished, and its gRPC server has
        stopped, waiting for late arrivals. What an engine still holds then belongs to callers
        already gone. Only a shutdown running past graceful_shutdown_timeout_s (ReplicaArgs)
        cuts calls, and then Ray kills the actor without calling this.
        """
        models = getattr(self, "models", None)
        if models is not None:
            models.close(timeout_s=0)


def _time_remaining(metadata) -> float | None:
    """Seconds the caller will wait, from the SDK's timeout metadata; None if not sent."""
    for key, value in metadata:
        if key == TIMEOUT_METADATA:
            try:
                return max(float(value) / 1000, 0.0)
            except ValueError:
                return None
    return None


def _reply(outcome: Outcome, grpc_context: RayServegRPCContext, empty):
    """The response, or an empty message with the outcome's status and plain message.

    Returning (not raising) keeps Ray from logging a traceback for every refused call under
    overload; attnserve's own metrics count the status.
    """
    if outcome.code is None:
        return outcome.response
    _set_status(outcome, grpc_context)
    return empty()


async def _streamed(rpc, request, grpc_context: RayServegRPCContext):
    """The messages of a streamed rpc; a failure ends the stream with its status."""
    metadata = grpc_context.invocation_metadata()
    async for outcome in rpc(request, _time_remaining(metadata), metadata):
        if outcome.code is not None:
            _set_status(outcome, grpc_context)
            return
        yield outcome.response


def _set_status(outcome: Outcome, grpc_context: RayServegRPCContext) -> None:
    """Sets a failed outcome's status and plain message on the call."""
    grpc_context.set_code(grpc.StatusCode[outcome.code.name])
    grpc_context.set_details(outcome.message)


def app_builder(args: dict | AppArgs) -> Application:
    """Builds an attnserve application: one `attnserve` deployment holding its group's models.

    Ray Serve calls this with the `args:` of the config file.

    Raises:
        ManifestError: if the repository is missing or empty, holds an invalid entry, or lacks a
            model the group names.
    """
    args = AppArgs.model_validate(args)
    repository = Path(args.model_repository).resolve()
    try:
        chosen = args.serving.wanted(repository, args.models)
    except FileNotFoundError as e:
        raise ManifestError(str(e)) from e
    if not chosen:
        raise ManifestError(
            f"no models found in {args.model_repository} (or none its version policies choose)"
        )
    missing = sorted(set(args.models) - {name for name, _ in chosen})
    if missing:
        raise ManifestError(
            f"models {missing} are not in {args.model_repository} (or no version of theirs is chosen)"
        )
    for path in chosen.values():  # a broken entry fails the deploy here, not in every replica
        Manifest.load(path)
    r = args.replica
    if r.autoscaling is not None:  # Ray refuses num_replicas beside autoscaling_config
        sizing = {"autoscaling_config": r.autoscaling.ray_config(args.serving.defaults.max_batch_size)}
    else:
        sizing = {"num_replicas": r.num_replicas}
    return Attnserve.options(
        **sizing,
        max_ongoing_requests=r.max_ongoing_requests,
        graceful_shutdown_timeout_s=r.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
        user_config=args.serving.model_dump(mode="json"),
        ray_actor_options={"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
    ).bind(str(repository), args.models, args.runtime.runtime_config(), args.serving.model_dump(mode="json"))
