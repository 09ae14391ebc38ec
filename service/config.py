"""Serving configuration.

One source: a Ray Serve config file (the format of `serve deploy` and KubeRay's
`serveConfigV2`), validated with Ray's own schema. Its application is built by
`attnserve.service.app:app_builder` from `AppArgs`; every model in the repository becomes a
deployment named `model-<name>` with the defaults in `AppArgs.model_defaults`, which the file's
`deployments:` entries can override per model. `LocalOptions` holds what only `attnserve serve`
needs: which Ray to use and command-line overrides of the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.schema import ServeDeploySchema

DEFAULT_SERVE_CONFIG = Path("deploy/serve/attnserve.yaml")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RuntimeArgs(_Frozen):
    """ONNX Runtime settings; see RuntimeConfig."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    require_first: bool = False
    intra_op_threads: int = Field(0, ge=0)


class BatchingConfig(_Frozen):
    """Dynamic batching of one model replica: its Ray Serve `user_config` (no restart to change)."""

    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)


class ModelDeploymentArgs(_Frozen):
    """Defaults for every model deployment; the config file may override them per model."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(512, ge=-1)
    batching: BatchingConfig = BatchingConfig()


class AppArgs(_Frozen):
    """Arguments of `app_builder`: the `args:` of the attnserve application in the config file."""

    model_repository: str = "model_repository"
    runtime: RuntimeArgs = RuntimeArgs()
    model_defaults: ModelDeploymentArgs = ModelDeploymentArgs()


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
    max_batch_size: int | None = None  # batching overrides apply to every model
    batch_wait_timeout_s: float | None = None


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
        batching = {
            "max_batch_size": options.max_batch_size,
            "batch_wait_timeout_s": options.batch_wait_timeout_s,
        }
        batching = {k: v for k, v in batching.items() if v is not None}
        if batching:
            merged = {**args["model_defaults"]["batching"], **batching}
            args["model_defaults"]["batching"] = BatchingConfig.model_validate(merged).model_dump()
            for deployment in app.get("deployments", []):
                deployment.pop("user_config", None)
        app["args"] = args
    return config
