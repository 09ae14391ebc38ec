"""`attnserve batch --plot-first N`: attention pictures of the input's first N rows."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from attnserve.service.batch.decoder import prepare
from attnserve.service.batch.reader import input_format, iter_rows
from attnserve.service.core.errors import RequestError
from attnserve.service.core.manifest import Manifest
from attnserve.service.core.translation import AttentionMode, Translator


def plot_first(manifest: Manifest, source: Path, count: int, folder: Path) -> list[Path]:
    """Decodes the first `count` input rows with the model and draws each one's cross attention.

    The rows are read and validated as the job reads them; a row the model refuses gets no picture.

    Returns:
        The PNG files written into `folder`, named by row number and id.
    """
    from attnserve.service.plotting import save, translation_figure

    images = manifest.image is not None
    translator = Translator(manifest)
    written = []
    for number, row in enumerate(
        itertools.islice(iter_rows(source, input_format(source, images), images), count)
    ):
        try:
            request = prepare(translator.codec, row, AttentionMode.CROSS)
        except RequestError:
            continue
        (result,) = translator.translate_batch([request])
        if isinstance(result, RequestError):
            continue
        name = re.sub(r"[^\w.-]+", "_", str(Path(row["id"]).with_suffix("")) if images else row["id"])[:60]
        written.append(
            save(translation_figure(result, manifest, request), folder / f"{number:05d}-{name}.png")
        )
    return written
