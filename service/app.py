"""The Ray Serve application: one batching deployment per model behind a gRPC ingress."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import grpc
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from attnserve.service import metrics
from attnserve.service.config import AppArgs, BatchingConfig
from attnserve.service.core.errors import ErrorCode, RequestError
from attnserve.service.core.manifest import Manifest, ManifestError, discover
from attnserve.service.core.onnx_model import RuntimeConfig
from attnserve.service.core.translation import PreparedRequest, SourceCodec, Translation, Translator
from attnserve.service.grpc_mapping import (
    attention_from_pb,
    caption_to_pb,
    model_info_to_pb,
    translation_to_pb,
)
from attnserve.v1 import translator_pb2 as pb

log = logging.getLogger("attnserve")
PROVIDER_GAUGE_PERIOD_S = 5
UNKNOWN_MODEL_TAG = "_unknown"  # never put client-chosen names into metric labels


@serve.deployment
class ModelServer:
    """Decodes batches for one model; batching settings arrive as user_config."""

    def __init__(self, entry: str, runtime: RuntimeConfig):
        self.translator = Translator(Manifest.load(Path(entry)), runtime)
        m = self.translator.manifest
        self.tags = {"model": m.name, "version": m.version}
        threading.Thread(target=self._report_providers, name="provider-gauge", daemon=True).start()

    def _report_providers(self) -> None:
        """Keeps the provider gauge exported: Ray drops a gauge not set for ~20 s from /metrics."""
        while True:
            for provider in self.translator.model.providers:
                metrics.execution_provider().set(1, tags={**self.tags, "provider": provider})
            time.sleep(PROVIDER_GAUGE_PERIOD_S)

    def reconfigure(self, user_config: dict) -> None:
        """Applies a BatchingConfig without restarting the replica (Ray Serve user_config)."""
        batching = BatchingConfig.model_validate(user_config)
        self._decode_batch.set_max_batch_size(batching.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime execution providers in use."""
        return self.translator.model.providers

    async def translate(self, request: PreparedRequest) -> Translation | RequestError:
        """Queues one prepared request into the next batch and returns its result."""
        return await self._decode_batch((request, time.perf_counter()))

    @serve.batch(**BatchingConfig().model_dump())  # replaced by user_config in reconfigure()
    async def _decode_batch(self, items: list[tuple[PreparedRequest, float]]):
        # The model call stays synchronous: awaiting a thread here lets Serve start the next
        # batch while this one runs, and batches collapse to size ~1 (FACTS.md).
        started = time.perf_counter()
        for _, queued_at in items:
            metrics.batch_wait().observe(started - queued_at, tags=self.tags)
        metrics.batch_size().observe(len(items), tags=self.tags)
        results = self.translator.translate_batch([r for r, _ in items])
        metrics.decode_latency().observe(time.perf_counter() - started, tags=self.tags)
        produced = sum(len(r.output_tokens) for r in results if isinstance(r, Translation))
        if produced:
            metrics.output_tokens().inc(produced, tags=self.tags)
        return results


@serve.deployment(name="ingress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class TranslatorIngress:
    """gRPC methods of attnserve.v1.Translator: validate, route to the model, map the result."""

    def __init__(self, entries: dict[str, str], handles: dict[str, DeploymentHandle]):
        self.manifests = {
            name: Manifest.load(Path(path), verify_checksums=False) for name, path in entries.items()
        }
        self.codecs = {name: SourceCodec(m) for name, m in self.manifests.items()}
        self.handles = handles

    async def Translate(self, request: pb.TranslateRequest, grpc_context: RayServegRPCContext):
        """Validates the text before it joins a batch; every error gets its own status."""

        def prepare(codec: SourceCodec, mode, o) -> PreparedRequest:
            return codec.prepare(
                request.text, mode, o.max_output_tokens, o.beam_size, o.length_penalty, request.locale
            )

        return await self._run("Translate", request, grpc_context, prepare, translation_to_pb)

    async def Caption(self, request: pb.CaptionRequest, grpc_context: RayServegRPCContext):
        """Decodes and checks the image before it joins a batch; every error gets its own status."""

        def prepare(codec: SourceCodec, mode, o) -> PreparedRequest:
            return codec.prepare_image(
                request.image, mode, o.max_output_tokens, o.beam_size, o.length_penalty
            )

        return await self._run("Caption", request, grpc_context, prepare, caption_to_pb)

    async def _run(self, rpc: str, request, grpc_context: RayServegRPCContext, prepare, to_pb):
        """Routes one Translate/Caption request: validate (prepare), decode in the model's batch, map."""
        manifest = self.manifests.get(request.model)

        async def work():
            if manifest is None:
                served = ", ".join(sorted(self.manifests))
                raise RequestError(
                    ErrorCode.NOT_FOUND, f"no model named {request.model!r}; served models: {served}"
                )
            options = request.options
            prepared = prepare(self.codecs[request.model], attention_from_pb(options.attention), options)
            return to_pb(await self._call_model(request.model, prepared), manifest)

        model, version = (manifest.name, manifest.version) if manifest else (UNKNOWN_MODEL_TAG, "")
        return await _answer(rpc, model, version, grpc_context, work)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext):
        """Served models with their manifest figures and the providers they run on."""

        async def work() -> pb.ListModelsResponse:
            models = []
            for name, manifest in sorted(self.manifests.items()):
                providers = await self.handles[name].providers.remote()
                models.append(model_info_to_pb(manifest, providers))
            return pb.ListModelsResponse(models=models)

        return await _answer("ListModels", "", "", grpc_context, work)

    async def _call_model(self, name: str, prepared: PreparedRequest) -> Translation:
        """Calls the model deployment; Ray's overload and restart errors become retryable statuses."""
        try:
            result = await self.handles[name].translate.remote(prepared)
        except BackPressureError:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED, f"model {name!r} is overloaded; retry with backoff"
            ) from None
        except (DeploymentUnavailableError, RayActorError):
            raise RequestError(ErrorCode.UNAVAILABLE, f"model {name!r} is restarting; retry") from None
        if isinstance(result, RequestError):
            raise result
        return result


async def _answer(rpc: str, model: str, version: str, context: RayServegRPCContext, work):
    """Runs one rpc: records latency and errors, and turns every failure into a clean status.

    Anything that is not a RequestError is logged with an incident id, and the client gets
    INTERNAL with only that id: no traceback, pid or Ray error text.
    """
    tags = {"model": model, "version": version, "rpc": rpc, "code": "OK"}
    started = time.perf_counter()
    try:
        return await work()
    except Exception as exc:
        error = exc
        if not isinstance(exc, RequestError):
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s in %s", incident, rpc)
            error = RequestError(ErrorCode.INTERNAL, f"internal error (incident {incident})")
        tags["code"] = error.code.name
        metrics.request_errors().inc(tags=tags)
        context.set_code(grpc.StatusCode[error.code.name])
        context.set_details(error.message)
        raise error from None  # raising (not returning) makes Serve count the request as failed
    finally:
        metrics.request_latency().observe(time.perf_counter() - started, tags=tags)


def app_builder(args: dict | AppArgs) -> Application:
    """Builds the attnserve application: one ModelServer per model behind a TranslatorIngress.

    Ray Serve calls this with the `args:` of the config file.

    Raises:
        ManifestError: if the repository is missing, empty or holds an invalid entry.
    """
    args = AppArgs.model_validate(args)
    manifests = discover(Path(args.model_repository))
    if not manifests:
        raise ManifestError(f"no models found in {args.model_repository}")
    runtime = RuntimeConfig(**args.runtime.model_dump())
    d = args.model_defaults
    entries, handles = {}, {}
    for m in manifests:
        entries[m.name] = str(m.path.resolve())
        handles[m.name] = ModelServer.options(
            name=f"model-{m.name}",
            num_replicas=d.num_replicas,
            user_config=d.batching.model_dump(),
            max_ongoing_requests=max(d.max_ongoing_requests, d.batching.max_batch_size),
            max_queued_requests=d.max_queued_requests,
            ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        ).bind(entries[m.name], runtime)
    return TranslatorIngress.bind(entries, handles)
