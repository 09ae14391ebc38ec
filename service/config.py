"""Serving configuration.

One source: a Ray Serve config file (the format of `serve deploy` and KubeRay's
`serveConfigV2`), validated with Ray's own schema. Its application is built by
`attnserve.service.app:app_builder` from `AppArgs`: one deployment, `attnserve`, whose replicas
each hold an engine for every model of the application's group (all models by default). Its
`user_config` (a `ServingConfig`) sets batching and admission per model without a restart.
`LocalOptions` holds what only `attnserve serve` needs: which Ray to use and command-line
overrides of the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray.serve.schema import ServeDeploySchema

from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.scheduler import EngineConfig
from attnserve.core.versions import VersionPolicy, scan, wanted

DEFAULT_SERVE_CONFIG = Path("deploy/serve/attnserve.yaml")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RuntimeArgs(_Frozen):
    """ONNX Runtime settings; see RuntimeConfig."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    require_first: bool = False
    intra_op_threads: int = Field(0, ge=0)
    precision: Literal["fp32", "int8", "auto"] = "fp32"

    def runtime_config(self, **overrides: Any) -> RuntimeConfig:
        """The core's frozen dataclass, with any field overridden (e.g. intra_op_threads)."""
        return RuntimeConfig(**(self.model_dump() | overrides))


class EngineSettings(_Frozen):
    """Batching and admission of one model's engine (see core.scheduler.EngineConfig)."""

    max_batch_size: int = Field(32, ge=1, le=1024)
    max_batch_tokens: int = Field(0, ge=0)
    batch_wait_s: float = Field(0.0, ge=0, le=1)
    max_queued: int = Field(1024, ge=1)
    max_queue_wait_s: float = Field(2.0, gt=0, le=600)
    step_batching: bool = True
    quality_sample: float = Field(0.05, ge=0, le=1)

    def engine_config(self) -> EngineConfig:
        """The core's frozen dataclass."""
        return EngineConfig(**self.model_dump())


class VersionPolicyArgs(_Frozen):
    """Which versions of a model to serve: the latest N, a list, or all (core.versions.VersionPolicy)."""

    latest: int = Field(1, ge=0)
    versions: tuple[int, ...] = ()
    all: bool = False

    def policy(self) -> VersionPolicy:
        """The core's frozen dataclass."""
        return VersionPolicy(**self.model_dump())


class ServingConfig(_Frozen):
    """The replica's Ray Serve `user_config`; every change applies without a restart.

    defaults, models: engine settings for every model, overridable per model by name (any
        subset of the fields).
    versions, model_versions: the version policy of every model, overridable per model.
    traffic: per model, a weight per version for the calls that name no version (a canary);
        without one the highest loaded version answers them.
    poll_repository_s: 0 to read the repository only when the config changes; else how often
        each replica looks for versions added or removed there.
    """

    defaults: EngineSettings = EngineSettings()
    models: dict[str, dict[str, Any]] = {}
    versions: VersionPolicyArgs = VersionPolicyArgs()
    model_versions: dict[str, VersionPolicyArgs] = {}
    traffic: dict[str, dict[int, Annotated[float, Field(ge=0)]]] = {}
    poll_repository_s: float = Field(0.0, ge=0)

    def wanted(self, repository: Path, group: tuple[str, ...] = ()) -> dict[tuple[str, int], Path]:
        """(model, version) -> folder of every version these policies serve from the repository.

        Raises:
            FileNotFoundError: if the repository is not a folder.
        """
        overrides = {name: args.policy() for name, args in self.model_versions.items()}
        return wanted(scan(repository), self.versions.policy(), overrides, group)

    def for_model(self, name: str) -> EngineSettings:
        """The settings of one model: its overrides over the defaults.

        Raises:
            pydantic.ValidationError: if an override is not a valid EngineSettings field.
        """
        return EngineSettings.model_validate({**self.defaults.model_dump(), **self.models.get(name, {})})

    def engine_config(self, name: str) -> EngineConfig:
        """The core's engine settings of one model (see `for_model`)."""
        return self.for_model(name).engine_config()


class AutoscalingArgs(_Frozen):
    """Ray Serve autoscaling of the serving deployment (its `autoscaling_config`): Ray keeps
    between min_replicas and max_replicas replicas, adding one when the calls in flight per
    replica (queued in an engine or decoding) stay above target_ongoing_requests, and removing
    one when they stay below it.

    The defaults suit engines that answer in milliseconds to a few hundred: a replica is busy
    enough, not yet overloaded, when its engines hold about a full running batch, so the target
    defaults to the serving defaults' max_batch_size (None). Beyond that, calls wait in the
    engine's queue and their latency grows with every batch ahead of them, until admission
    (max_queue_wait_s, 2 s by default) refuses them. So scale up after a short 5 s above target
    (Ray's own default is 30 s): Ray already smooths the load (each replica reports it every
    10 s, averaged over a 30 s look-back window), so a burst of a second or two does not add a
    replica, and more delay only means more refused calls. Scale down only after 5 minutes
    below target (Ray's default is 10): a new replica costs a model load and warm-up (on
    Kubernetes possibly a new pod), so a downscale undone a minute later costs more than an
    idle replica.

    min_replicas is at least 1, no scale to zero. Ray 2.60 is built to wake a deployment with
    no replicas: HAProxy hands the call to Serve's fallback proxy (its backup server), whose
    queued call makes the controller add a replica. But that call, and every one behind it,
    then waits for a replica to load and warm up every model of its group (seconds; on
    Kubernetes minutes if a pod must start too), past the engines' admission budget and most
    callers' deadlines; and health checks (compose's, the worker pods' readiness probes) would
    themselves wake it, or fail while no replica serves.
    """

    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float | None = Field(None, gt=0)  # None: serving.defaults.max_batch_size
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling: max_replicas ({self.max_replicas}) must be at least "
                f"min_replicas ({self.min_replicas})"
            )
        return self

    def ray_config(self, max_batch_size: int) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config` (ray.serve.config.AutoscalingConfig fields), the
        target defaulting to max_batch_size."""
        target = self.target_ongoing_requests or float(max_batch_size)
        return self.model_dump() | {"target_ongoing_requests": target}


class ReplicaArgs(_Frozen):
    """Resources of the serving deployment's replicas (each holds every model of its group).

    num_replicas: a fixed number of replicas; or autoscaling, to let Ray Serve choose between
        bounds (not both).
    graceful_shutdown_timeout_s: how long a stopping replica (scale-down, redeploy, `serve
        delete`) may take: Ray stops routing calls to it, waits for the ones in flight, then
        runs its `__del__`; past this Ray kills it, cutting any call still running. It must
        exceed every model's max_queue_wait_s, the longest an admitted call is expected to wait.
    """

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # Ray's own bound on calls in a replica; admission control in the engines decides first.
    max_ongoing_requests: int = Field(4096, ge=1)
    graceful_shutdown_timeout_s: float = Field(20.0, gt=0)  # Ray's default

    @model_validator(mode="after")
    def _one_way_to_size(self) -> ReplicaArgs:
        if self.autoscaling is not None and self.num_replicas > 1:
            raise ValueError(
                f"replica: set num_replicas ({self.num_replicas}) or autoscaling, not both; with "
                "autoscaling, Ray Serve runs between min_replicas and max_replicas replicas"
            )
        return self


class AppArgs(_Frozen):
    """Arguments of `app_builder`: the `args:` of an attnserve application in the config file.

    models: the model group this application serves; empty for every model in the repository.
    """

    model_repository: str = "model_repository"
    models: tuple[str, ...] = ()
    runtime: RuntimeArgs = RuntimeArgs()
    replica: ReplicaArgs = ReplicaArgs()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _stops_after_admitted_calls(self) -> AppArgs:
        longest = self.serving.defaults.max_queue_wait_s
        for name in self.serving.models:
            try:
                longest = max(longest, self.serving.for_model(name).max_queue_wait_s)
            except ValidationError:  # an invalid override fails where it is used, with its own message
                continue
        if self.replica.graceful_shutdown_timeout_s <= longest:
            raise ValueError(
                f"replica: graceful_shutdown_timeout_s ({self.replica.graceful_shutdown_timeout_s:g}) "
                f"must exceed the longest max_queue_wait_s ({longest:g}), or a stopping replica "
                "could be killed with admitted calls still running"
            )
        return self


@dataclass(frozen=True)
class LocalOptions:
    """What `attnserve serve` adds to the config file. None leaves the file's value.

    address: a Ray cluster to deploy onto; None (and no $RAY_ADDRESS) starts a local Ray.
    metrics_port: the local Ray's Prometheus endpoint.
    """

    serve_config: Path = DEFAULT_SERVE_CONFIG
    address: str | None = None
    num_cpus: int | None = None
    metrics_port: int = 8080
    grpc_port: int | None = None
    http_port: int | None = None
    host: str | None = None
    model_repository: Path | None = None
    max_batch_size: int | None = None  # engine overrides apply to every model
    batch_wait_s: float | None = None
    max_queue_wait_s: float | None = None
    poll_repository_s: float | None = None  # watch the repository for versions (every replica)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas of every application


def load_serve_config(options: LocalOptions) -> ServeDeploySchema:
    """Reads the config file, applies the overrides, and validates it with Ray's schema.

    A relative model_repository is resolved against the current directory, because Ray builds
    the application in another process.

    Raises:
        ValueError: if the file is unreadable or invalid (pydantic's ValidationError is one).
    """
    try:
        raw = yaml.safe_load(Path(options.serve_config).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read serve config {options.serve_config}: {e}") from e
    return ServeDeploySchema.model_validate(apply_overrides(raw, options))


def app_args(serve_config: Path, repository: Path | None = None) -> AppArgs:
    """The validated `args` of a serve config's first application (runtime and serving settings).

    Args:
        serve_config: a Ray Serve config file (deploy/serve/attnserve.yaml).
        repository: a model repository to use instead of the file's.

    Raises:
        ValueError: if the file is unreadable or invalid.
    """
    config = load_serve_config(LocalOptions(serve_config=serve_config, model_repository=repository))
    return AppArgs.model_validate(config.applications[0].args)


def apply_overrides(raw: dict[str, Any], options: LocalOptions) -> dict[str, Any]:
    """A copy of the raw config with the command-line overrides applied."""
    config = copy.deepcopy(raw)
    if options.grpc_port is not None:
        config.setdefault("grpc_options", {})["port"] = options.grpc_port
    if options.http_port is not None:
        config.setdefault("http_options", {})["port"] = options.http_port
    if options.host is not None:
        config.setdefault("http_options", {})["host"] = options.host
    for app in config.get("applications", []):
        args = AppArgs.model_validate(app.get("args") or {}).model_dump(mode="json")
        if options.model_repository is not None:
            args["model_repository"] = str(options.model_repository)
        args["model_repository"] = str(Path(args["model_repository"]).resolve())
        engine = {
            "max_batch_size": options.max_batch_size,
            "batch_wait_s": options.batch_wait_s,
            "max_queue_wait_s": options.max_queue_wait_s,
        }
        engine = {k: v for k, v in engine.items() if v is not None}
        fields = {} if options.poll_repository_s is None else {"poll_repository_s": options.poll_repository_s}
        if options.autoscale is not None:  # instead of the file's num_replicas or autoscaling bounds
            replica = args["replica"]
            low, high = options.autoscale
            bounds = {"min_replicas": low, "max_replicas": high}
            replica.update(num_replicas=1, autoscaling={**(replica["autoscaling"] or {}), **bounds})
        if engine or fields:  # every model, here and in the file's user_config
            args["serving"] = _override_serving(args["serving"], engine, fields)
            for deployment in app.get("deployments", []):
                if "user_config" in deployment:
                    deployment["user_config"] = _override_serving(deployment["user_config"], engine, fields)
        AppArgs.model_validate(args)  # the overrides too: refused here, not later in Ray's build
        app["args"] = args
    return config


def _override_serving(
    serving: dict[str, Any], engine: dict[str, Any], fields: dict[str, Any]
) -> dict[str, Any]:
    """A ServingConfig dict with `engine` settings applied to the defaults and to every model, and
    `fields` (ServingConfig's own) replaced."""
    config = ServingConfig.model_validate(serving)
    defaults = {**config.defaults.model_dump(), **engine}
    models = {name: {**given, **engine} for name, given in config.models.items()}
    merged = {**config.model_dump(), **fields, "defaults": defaults, "models": models}
    return ServingConfig.model_validate(merged).model_dump(mode="json")
