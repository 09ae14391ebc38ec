"""The actor of a batch job's decode stage: validates rows and decodes them with the serving engine."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from attnserve.service.batch.rows import output_table
from attnserve.service.core.engine import Engine, EngineConfig
from attnserve.service.core.errors import RequestError, invalid
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.onnx_model import RuntimeConfig
from attnserve.service.core.translation import AttentionMode, SourceCodec, Translation, Translator


@dataclass(frozen=True)
class DecoderConfig:
    """What every decode actor builds: the model entry, its runtime and engine, what it returns."""

    entry: str  # the model's repository folder (model/version)
    runtime: RuntimeConfig
    engine: EngineConfig
    attention: bool


def offline(engine: EngineConfig, rows: int) -> EngineConfig:
    """The online engine settings with admission opened up: a job queues a whole batch of rows
    at once and waits for all of them (batching itself is unchanged)."""
    return replace(engine, max_queued=max(engine.max_queued, rows), max_queue_wait_s=math.inf)


def prepare(codec: SourceCodec, row: dict, mode: AttentionMode):
    """The engine request of an input row, validated as the gRPC servicer validates a call.

    Raises:
        RequestError: INVALID_ARGUMENT for a row that could not be read or that the model refuses.
    """
    if row["error"]:
        raise invalid(row["error"])
    if codec.manifest.image is not None:
        return codec.prepare_image(row["image"], mode)
    return codec.prepare(row["text"], mode, locale=row["locale"] or "")


def decode_rows(
    engine: Engine, rows: Iterable[dict], mode: AttentionMode
) -> Iterator[Translation | RequestError]:
    """Submits every row to the engine at once, then yields each row's result in order."""
    pending: list[Future | RequestError] = []
    for row in rows:
        try:
            pending.append(engine.submit(prepare(engine.translator.codec, row, mode)))
        except RequestError as e:
            pending.append(e)
    for item in pending:
        if isinstance(item, RequestError):
            yield item
            continue
        try:
            yield item.result()
        except RequestError as e:
            yield e


class Decoder:
    """Ray Data's callable class: one engine per actor, built once; pyarrow batch in, batch out."""

    def __init__(self, config: DecoderConfig):
        manifest = Manifest.load(Path(config.entry))
        self.engine = Engine(Translator(manifest, config.runtime), config.engine)
        self.mode = AttentionMode.CROSS if config.attention else AttentionMode.NONE
        self.attention = config.attention

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The output rows of a batch of input rows."""
        rows = batch.to_pylist()
        results = list(decode_rows(self.engine, rows, self.mode))
        return output_table([r["id"] for r in rows], results, self.engine.translator.manifest, self.attention)
