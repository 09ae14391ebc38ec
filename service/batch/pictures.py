"""`attnserve batch --plot-first N`: attention pictures of the input's first N rows."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from attnserve.core.engine import Engine
from attnserve.core.errors import RequestError
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from attnserve.service.batch.decode_actor import decode_rows, prepare
from attnserve.service.batch.reader import input_format, iter_rows


def plot_first(manifest: Manifest, source: Path, count: int, folder: Path) -> list[Path]:
    """Decodes the first `count` input rows with the model and draws each one's cross attention.

    The rows are read and validated as the job reads them; a row the model refuses gets no picture.

    Returns:
        The PNG files written into `folder`, named by row number and id.
    """
    from attnserve.service.plotting import answer_figure, save

    images = manifest.image is not None
    rows = list(itertools.islice(iter_rows(source, input_format(source, images), images), count))
    with Engine(ModelRunner(manifest)) as engine:
        results = list(decode_rows(engine, rows, AttentionMode.CROSS))
    written = []
    for number, (row, result) in enumerate(zip(rows, results, strict=True)):
        if isinstance(result, RequestError):
            continue
        request = prepare(engine.runner.codec, row, AttentionMode.CROSS)  # the labels of its picture
        name = re.sub(r"[^\w.-]+", "_", str(Path(row["id"]).with_suffix("")) if images else row["id"])[:60]
        written.append(save(answer_figure(result, manifest, request), folder / f"{number:05d}-{name}.png"))
    return written
