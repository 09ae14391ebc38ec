"""The actor of a batch job's decode stage: validates rows and decodes them with the serving engine."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from attnserve.core.codec import SourceCodec
from attnserve.core.engine import Engine, answer_all, start_engine
from attnserve.core.errors import RequestError, invalid
from attnserve.core.manifest import Manifest
from attnserve.core.onnx_model import RuntimeConfig
from attnserve.core.requests import Answer, AttentionMode, PreparedRequest
from attnserve.core.scheduler import EngineConfig
from attnserve.service.batch.rows import output_table


@dataclass(frozen=True)
class DecodeActorConfig:
    """What every decode actor builds: the model entry, its runtime and engine, what it returns."""

    entry: str  # the model's repository folder (model/version)
    runtime: RuntimeConfig
    engine: EngineConfig
    attention: bool
    scores: bool = False


def offline(engine: EngineConfig, rows: int) -> EngineConfig:
    """The online engine settings with admission opened up: a job queues a whole batch of rows
    at once and waits for all of them (batching itself is unchanged); no rows are scored for the
    answer-quality metrics, which a batch job does not record."""
    return replace(engine, max_queued=max(engine.max_queued, rows), max_queue_wait_s=math.inf,
                   quality_sample=0.0)  # fmt: skip


def prepare(codec: SourceCodec, row: dict, mode: AttentionMode, scores: bool = False):
    """The engine request of an input row, validated as the gRPC servicer validates a call.

    Raises:
        RequestError: INVALID_ARGUMENT for a row that could not be read or that the model refuses.
    """
    if row["error"]:
        raise invalid(row["error"])
    if codec.manifest.image is not None:
        return codec.prepare_image(row["image"], mode, scores=scores)
    return codec.prepare(row["text"], mode, locale=row["locale"] or "", scores=scores)


def decode_rows(
    engine: Engine, rows: Iterable[dict], mode: AttentionMode, scores: bool = False
) -> Iterator[Answer | RequestError]:
    """Validates every row and decodes the valid ones together; yields each row's result in order."""
    prepared: list[PreparedRequest | RequestError] = []
    for row in rows:
        try:
            prepared.append(prepare(engine.runner.codec, row, mode, scores))
        except RequestError as e:
            prepared.append(e)
    answers = answer_all(engine, [r for r in prepared if not isinstance(r, RequestError)])
    for item in prepared:
        yield item if isinstance(item, RequestError) else next(answers)


class DecodeActor:
    """Ray Data's callable class: one engine per actor, built once; pyarrow batch in, batch out."""

    def __init__(self, config: DecodeActorConfig):
        manifest = Manifest.load(Path(config.entry))
        self.engine = start_engine(manifest, config.runtime, config.engine)
        self.mode = AttentionMode.CROSS if config.attention else AttentionMode.NONE
        self.attention, self.scores = config.attention, config.scores

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The output rows of a batch of input rows."""
        rows = batch.to_pylist()
        results = list(decode_rows(self.engine, rows, self.mode, self.scores))
        manifest = self.engine.runner.manifest
        return output_table([r["id"] for r in rows], results, manifest, self.attention, self.scores)
