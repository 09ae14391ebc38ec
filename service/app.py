"""The Ray Serve application: one batching deployment per model behind a gRPC ingress."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import grpc
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from attnserve.service import metrics
from attnserve.service.config import ServeConfig
from attnserve.service.errors import ErrorCode, RequestError
from attnserve.service.grpc_mapping import attention_from_pb, model_info_to_pb, translation_to_pb
from attnserve.service.manifest import Manifest, ManifestError, discover
from attnserve.service.runtime.onnx_model import RuntimeConfig
from attnserve.service.translation import PreparedRequest, SourceCodec, Translation, Translator
from attnserve.v1 import translator_pb2 as pb

log = logging.getLogger("attnserve")
UNKNOWN_MODEL_TAG = "_unknown"  # never put client-chosen names into metric labels


@serve.deployment
class ModelServer:
    """Decodes batches for one model; batching settings arrive as user_config."""

    def __init__(self, entry: str, runtime: RuntimeConfig):
        self.translator = Translator(Manifest.load(Path(entry)), runtime)
        m = self.translator.manifest
        self.tags = {"model": m.name, "version": m.version}

    def reconfigure(self, user_config: dict) -> None:
        """Applies BatchingConfig fields without restarting the replica."""
        self._decode_batch.set_max_batch_size(int(user_config["max_batch_size"]))
        self._decode_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime execution providers in use."""
        return self.translator.model.providers

    async def translate(self, request: PreparedRequest) -> Translation | RequestError:
        """Queues one prepared request into the next batch and returns its result."""
        return await self._decode_batch((request, time.perf_counter()))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
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


def _abort(context: RayServegRPCContext, error: RequestError) -> None:
    """Sets the status on the context and raises, so Serve also counts the request as failed."""
    context.set_code(grpc.StatusCode[error.code.name])
    context.set_details(error.message)
    raise error


@serve.deployment
class TranslatorIngress:
    """gRPC methods of attnserve.v1.Translator: validate, route to the model, map the result."""

    def __init__(self, entries: dict[str, str], handles: dict[str, DeploymentHandle]):
        self.manifests = {
            name: Manifest.load(Path(path), verify_checksums=False) for name, path in entries.items()
        }
        self.codecs = {name: SourceCodec(m) for name, m in self.manifests.items()}
        self.handles = handles

    async def Translate(self, request: pb.TranslateRequest, grpc_context: RayServegRPCContext):
        """Validates before the request joins a batch; every error gets its own status."""
        started = time.perf_counter()
        manifest = self.manifests.get(request.model)
        tags = {
            "model": request.model if manifest else UNKNOWN_MODEL_TAG,
            "version": manifest.version if manifest else "",
            "rpc": "Translate",
            "code": "OK",
        }
        try:
            if manifest is None:
                raise RequestError(
                    ErrorCode.NOT_FOUND,
                    f"no model named {request.model!r}; served models: {', '.join(sorted(self.manifests))}",
                )
            prepared = self.codecs[request.model].prepare(
                request.text, attention_from_pb(request.options.attention), request.options.max_output_tokens
            )
            result = await self._call_model(request.model, prepared)
            return translation_to_pb(result, manifest)
        except RequestError as error:
            tags["code"] = error.code.name
            _abort(grpc_context, error)
        finally:
            if tags["code"] != "OK":
                metrics.request_errors().inc(tags=tags)
            metrics.request_latency().observe(time.perf_counter() - started, tags=tags)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext):
        """Served models with their manifest figures and the providers they run on."""
        models = []
        for name, manifest in sorted(self.manifests.items()):
            providers = await self.handles[name].providers.remote()
            models.append(model_info_to_pb(manifest, providers))
        return pb.ListModelsResponse(models=models)

    async def _call_model(self, name: str, prepared: PreparedRequest) -> Translation:
        """Calls the model deployment; turns Ray's failures into client-safe errors."""
        try:
            result = await self.handles[name].translate.remote(prepared)
        except BackPressureError:
            raise RequestError(
                ErrorCode.RESOURCE_EXHAUSTED, f"model {name!r} is overloaded; retry with backoff"
            ) from None
        except (DeploymentUnavailableError, RayActorError):
            raise RequestError(ErrorCode.UNAVAILABLE, f"model {name!r} is restarting; retry") from None
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error %s while calling model %s", incident, name)
            raise RequestError(ErrorCode.INTERNAL, f"internal error (incident {incident})") from None
        if isinstance(result, RequestError):
            raise result
        return result


def build_app(config: ServeConfig):
    """Binds one ModelServer per model in the repository behind a TranslatorIngress.

    Raises:
        ManifestError: if the repository is missing, empty or holds an invalid entry.
    """
    manifests = discover(config.model_repository)
    if not manifests:
        raise ManifestError(f"no models found in {config.model_repository}")
    batching = {
        "max_batch_size": config.batching.max_batch_size,
        "batch_wait_timeout_s": config.batching.batch_wait_timeout_s,
    }
    entries, handles = {}, {}
    for m in manifests:
        entries[m.name] = str(m.path.resolve())
        handles[m.name] = ModelServer.options(
            name=f"model-{m.name}",
            num_replicas=config.replicas_per_model,
            user_config=batching,
            max_ongoing_requests=max(config.max_ongoing_requests, config.batching.max_batch_size),
            max_queued_requests=config.max_queued_requests,
            ray_actor_options={"num_cpus": config.cpus_per_replica},
        ).bind(entries[m.name], config.runtime)
    return TranslatorIngress.options(
        name="ingress",
        max_ongoing_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(entries, handles)
