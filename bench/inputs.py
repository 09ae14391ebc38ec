"""Real held-out inputs for every kind of bundled model, as gRPC requests and as engine requests.

G2P models get CMUdict test words; date models test dates with their locales; parallel-text
models (EN->FR) the held-out test sources of their TSV; caption models Fashion-MNIST test scenes
as PNG bytes. Inputs a model cannot take (too long, unknown characters) are left out, so every
call of a run is a valid one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnserve.core.codec import SourceCodec
from attnserve.core.errors import RequestError
from attnserve.core.manifest import Manifest
from attnserve.core.requests import AttentionMode, PreparedRequest
from attnserve.v1 import translator_pb2 as pb

DEFAULT_COUNT = 300


@dataclass(frozen=True)
class Sample:
    """One input: text (with its locale, for date models) or an encoded image."""

    text: str = ""
    locale: str = ""
    image: bytes = b""


@dataclass(frozen=True)
class Workload:
    """A model's inputs, ready for both sides: prebuilt gRPC requests and raw samples."""

    model: str
    rpc: str  # "Translate" or "Caption"
    samples: tuple[Sample, ...]
    requests: tuple[pb.TranslateRequest | pb.CaptionRequest, ...]


def load_workload(manifest: Manifest, count: int = DEFAULT_COUNT, attention: bool = True) -> Workload:
    """Test inputs of one model as a Workload.

    Args:
        manifest: the model's manifest; its task decides where inputs come from.
        count: how many inputs at most.
        attention: ask for cross attention (ATTENTION_MODE_CROSS) in every request.

    Returns:
        The workload; every sample passes the model's own validation.

    Raises:
        ValueError: for a task the bench has no inputs for, or when no input is valid.
    """
    codec = SourceCodec(manifest)
    samples = [s for s in _samples(manifest, count) if _valid(codec, s)]
    if not samples:
        raise ValueError(f"no valid test inputs for {manifest.name}")
    mode = pb.ATTENTION_MODE_CROSS if attention else pb.ATTENTION_MODE_NONE
    rpc = "Caption" if manifest.image is not None else "Translate"
    requests = tuple(to_request(manifest.name, s, mode) for s in samples)
    return Workload(manifest.name, rpc, tuple(samples), requests)


def to_request(model: str, sample: Sample, attention: int) -> pb.TranslateRequest | pb.CaptionRequest:
    """The gRPC request for one sample (a CaptionRequest when it holds an image)."""
    options = pb.TranslateOptions(attention=attention)
    if sample.image:
        return pb.CaptionRequest(model=model, image=sample.image, options=options)
    return pb.TranslateRequest(model=model, text=sample.text, locale=sample.locale, options=options)


def prepare(codec: SourceCodec, sample: Sample, attention: bool = True) -> PreparedRequest:
    """The engine request for one sample, validated as the servicer would."""
    mode = AttentionMode.CROSS if attention else AttentionMode.NONE
    if sample.image:
        return codec.prepare_image(sample.image, mode)
    return codec.prepare(sample.text, mode, locale=sample.locale)


def _valid(codec: SourceCodec, sample: Sample) -> bool:
    """True if the model accepts the sample."""
    try:
        prepare(codec, sample, attention=False)
    except RequestError:
        return False
    return True


def _samples(manifest: Manifest, count: int) -> list[Sample]:
    """Up to `count` test inputs by the model's task."""
    if manifest.image is not None:
        return _scenes(count)
    loaders = {"g2p": _words, "dates": _dates, "parallel-text": _parallel_text}
    if manifest.task not in loaders:
        raise ValueError(f"the bench has no test inputs for task {manifest.task!r} ({manifest.name})")
    return loaders[manifest.task](manifest, count)


def _words(manifest: Manifest, count: int) -> list[Sample]:
    """CMUdict test words, spread over the alphabet."""
    from attnserve.models.g2p_data import load_split

    words = [e.word for e in load_split("test")]
    return [Sample(text=w) for w in words[:: max(len(words) // count, 1)][:count]]


def _dates(manifest: Manifest, count: int) -> list[Sample]:
    """Test dates written in random locales, with their locale."""
    from attnserve.models import dates_data

    return [Sample(text=e.text, locale=e.locale) for e in dates_data.sample("test", count, seed=0)]


def _parallel_text(manifest: Manifest, count: int) -> list[Sample]:
    """The held-out test sources of the model's TSV (the split its task recorded)."""
    from attnserve.models.tasks.parallel_text import read_pairs, split_pairs

    args = manifest.raw.get("task_args", {})
    path = Path(args["path"])  # relative to where it was trained: the repository's parent, usually
    if not path.is_absolute() and not path.exists():
        path = manifest.path.resolve().parents[2] / path
    test = split_pairs(read_pairs(path), args.get("held_out", 0), path)["test"]
    return [Sample(text=source) for source, _ in test[:count]]


def _scenes(count: int) -> list[Sample]:
    """Fashion-MNIST test scenes as PNG bytes."""
    from PIL import Image

    from attnserve.models import scenes_data

    def png(canvas: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray((canvas * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    return [Sample(image=png(s.image)) for s in scenes_data.generate("test", count, seed=0)]
