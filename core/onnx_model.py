"""ONNX Runtime sessions for one model-repository entry, behind the decode loop's interface."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from attnserve.core.manifest import GraphSpec, Manifest, ManifestError
from attnserve.core.wiring import WiredStepModel

log = logging.getLogger(__name__)


class ProviderError(RuntimeError):
    """None of the configured execution providers can run here, or a required one is missing."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How sessions are built.

    providers: execution providers to try, in priority order; those not available are skipped.
    require_first: fail instead of falling back when the first provider is unavailable
        (a GPU profile on a host without a GPU must not silently serve on CPU).
    intra_op_threads: 0 lets ONNX Runtime choose.
    allow_spinning: ORT's default spin-wait costs 1.2-1.8x on small CPU hosts, so it is off.
    precision: "fp32" runs the entry's float graphs; "int8" its dynamically quantised variant
        (an entry without one is refused); "auto" the int8 variant where export found its quality
        loss within the limit (0.5 BLEU / 0.5 points), else fp32.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    require_first: bool = False
    intra_op_threads: int = 0
    allow_spinning: bool = False
    precision: str = "fp32"
    profile_prefix: str = ""  # set: ONNX Runtime writes each session's op profile (JSON) there

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


PRECISIONS = ("fp32", "int8", "auto")


def choose_precision(manifest: Manifest, precision: str) -> str:
    """The precision an entry runs at for a configured precision ("fp32", "int8" or "auto").

    Raises:
        ManifestError: if int8 is asked of an entry without an int8 variant.
    """
    int8 = manifest.variants.get("int8")
    if precision == "int8" and int8 is None:
        raise ManifestError(f"{manifest.path}: no int8 variant; add one with `attnserve quantize`")
    if precision == "auto":
        return "int8" if int8 is not None and int8.qualifies else "fp32"
    return precision


def choose_providers(config: RuntimeConfig) -> list[str]:
    """Configured providers that this onnxruntime build offers, in order.

    Raises:
        ProviderError: if none is available, or the first is missing and require_first is set.
    """
    available = set(ort.get_available_providers())
    chosen = [p for p in config.providers if p in available]
    missing = [p for p in config.providers if p not in available]
    if missing and config.require_first and config.providers[0] in missing:
        raise ProviderError(
            f"execution provider {config.providers[0]} is required but this host offers only "
            f"{sorted(available)}"
        )
    if not chosen:
        raise ProviderError(f"none of {list(config.providers)} is available; have {sorted(available)}")
    if missing:
        log.warning("execution providers %s are not available; using %s", missing, chosen)
    return chosen


class OnnxSeq2Seq(WiredStepModel):
    """Encoder and decoder-step ONNX Runtime sessions wired as the manifest describes."""

    def __init__(self, manifest: Manifest, config: RuntimeConfig = RuntimeConfig()):
        self.manifest = manifest
        self.precision = choose_precision(manifest, config.precision)
        graphs: tuple[GraphSpec, GraphSpec] = (manifest.encoder, manifest.decoder_step)
        if self.precision != "fp32":
            variant = manifest.variants[self.precision]
            graphs = (variant.encoder, variant.decoder_step)
        options = session_options(config)
        providers = choose_providers(config)
        self.encoder, self.decoder = (
            ort.InferenceSession(str(manifest.path / g.file), options, providers=providers) for g in graphs
        )
        self.providers = tuple(self.decoder.get_providers())
        log.info("%s v%s runs %s on %s", manifest.name, manifest.version, self.precision,
                 ", ".join(self.providers))  # fmt: skip
        try:
            super().__init__(
                manifest.decoder,
                _named(self.encoder),
                _named(self.decoder),
                [(i.name, i.shape) for i in self.decoder.get_inputs()],
            )
        except ValueError as e:
            raise ValueError(f"{manifest.path}: {e}") from e


def session_options(config: RuntimeConfig) -> ort.SessionOptions:
    """Session options for a config: threads, no spin-waiting, every graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    if config.profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = config.profile_prefix
    return options


def _named(session: ort.InferenceSession):
    """A session as a function of named inputs to named outputs (inputs it does not take are ignored)."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(None, {k: feeds[k] for k in inputs}), strict=True))

    return run
