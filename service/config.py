"""Serving configuration: defaults, an optional YAML file, then command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from attnserve.service.runtime.onnx_model import RuntimeConfig


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of one model's replica (Ray Serve `user_config`; changes need no restart)."""

    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise ValueError(f"batch_wait_timeout_s must be within [0, 1] s, got {self.batch_wait_timeout_s}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `attnserve serve` needs.

    address: a Ray cluster to deploy onto ("auto", "ray://..."); None starts a local Ray.
    host: where the HTTP proxy binds (Ray Serve's gRPC port binds all interfaces regardless).
    metrics_port: the Ray metrics agent's Prometheus endpoint (local Ray only).
    """

    model_repository: Path = Path("model_repository")
    address: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    metrics_port: int = 8080
    num_cpus: int | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    replicas_per_model: int = 1
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int = 64
    max_queued_requests: int = 512

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> ServeConfig:
        """Defaults, then the YAML file at path (if any), then non-None overrides.

        Raises:
            ValueError: on an unknown key or a bad value.
        """
        values: dict[str, Any] = {}
        if path is not None:
            values = yaml.safe_load(Path(path).read_text("utf-8")) or {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown serve settings {sorted(unknown)}; known: {sorted(known)}")
        if isinstance(values.get("batching"), dict):
            values["batching"] = BatchingConfig(**values["batching"])
        if isinstance(values.get("runtime"), dict):
            runtime = dict(values["runtime"])
            if "providers" in runtime:
                runtime["providers"] = tuple(runtime["providers"])
            values["runtime"] = RuntimeConfig(**runtime)
        if "model_repository" in values:
            values["model_repository"] = Path(values["model_repository"])
        return cls(**values)
