"""Your own images and captions: a TSV of `image-file<TAB>caption` lines beside the images."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from attnserve.core.decoding import StepModel
from attnserve.core.errors import RequestError
from attnserve.core.images import decode_image
from attnserve.core.manifest import ImageSpec
from attnserve.core.sources import SourceBatch
from attnserve.core.vocab import SPECIALS, Vocab
from attnserve.models.sequence_errors import sequence_errors
from attnserve.models.tasks.base import Batch, TextExample, TextTask, target_arrays
from attnserve.models.tasks.caption import caption_images, image_source_section
from attnserve.models.tasks.parallel_text import portable, read_pairs, split_pairs


class ImageCaptionTask(TextTask):
    """PNG or JPEG images, each with one or more captions (one line each), read as words.

    Image paths are relative to the TSV's folder. Images are decoded and resized exactly as the
    Caption endpoint does. Every caption of one image stays in one split: 90/5/5 by a hash of the
    file name, or `held_out` images each for dev and test. Scored by exact caption match and word
    error rate against any of the image's captions.
    """

    name = "image-captions"
    max_source_tokens = 0
    primary, minimise = "exact_match", False

    def __init__(self, path: str | Path, image_size: int = 56, channels: int = 3, held_out: int = 0):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
        self.path, self.image_size, self.channels, self.held_out = Path(path), image_size, channels, held_out
        self.description = f"images and captions from {self.path.name}"
        spec = ImageSpec(image_size, image_size, channels, 0, 0)
        self._splits, self._pixels = {}, {}
        for split, items in split_pairs(read_pairs(self.path), held_out, self.path).items():
            words = [tuple(tuple(c.split()) for c in refs) for _, refs in items]
            self._splits[split] = [TextExample((name,), w) for (name, _), w in zip(items, words, strict=True)]
            self._pixels[split] = np.stack([self._read(name, spec) for name, _ in items])  # (N, C, H, W)
        self.max_output_tokens = 2 * max(len(r) for e in self._splits["train"] for r in e.references)

    def _read(self, name: str, spec: ImageSpec) -> np.ndarray:
        """One image's pixels (C, H, W).

        Raises:
            ValueError: if the file is missing or not an image the service reads.
        """
        file = self.path.parent / name
        try:
            return decode_image(file.read_bytes(), spec)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read {file}: {e.strerror}") from None
        except RequestError as e:
            raise ValueError(f"{self.path}: {file}: {e.message}") from None

    @property
    def arguments(self) -> dict:
        return {"path": portable(self.path), "image_size": self.image_size, "channels": self.channels,
                "held_out": self.held_out}  # fmt: skip

    def examples(self, split: str) -> list[TextExample]:
        return self._splits[split]

    def model_fields(self) -> dict:
        return {"image_size": self.image_size, "image_channels": self.channels}

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """No source tokens (the source is pixels); the words of the training captions."""
        return Vocab(SPECIALS), super().vocabularies()[1]

    def source_section(self, src_vocab: Vocab, config) -> dict:
        return image_source_section(src_vocab, config)

    def source_batches(self, split: str, count: int, batch_size: int, src_vocab: Vocab) -> list[SourceBatch]:
        pixels = self._pixels[split][:count]
        starts = range(0, len(pixels), batch_size)
        return [SourceBatch.from_images(pixels[i : i + batch_size]) for i in starts]

    def evaluate_model(
        self,
        model: StepModel,
        split: str,
        src_vocab: Vocab,
        tgt_vocab: Vocab,
        limit: int = 0,
        progress: bool = False,
        beam_size: int = 1,
    ) -> dict[str, float]:
        """Exact match and word error rate of the split's captions."""
        examples = self._splits[split][: limit or None]
        pixels = self._pixels[split][: len(examples)]
        preds, _ = caption_images(model, pixels, tgt_vocab, self.max_output_tokens, beam_size, progress)
        return self.score(preds, examples)

    def score(self, predictions: list[list[str]], examples: list[TextExample]) -> dict[str, float]:
        """Exact match and word error rate against any of each image's captions."""
        errors = sequence_errors(predictions, [e.references for e in examples])
        return {
            "exact_match": 1 - errors.sequence_error_rate,
            "word_error_rate": errors.token_error_rate,
            "examples": float(errors.sequences),
        }

    def train_batches(
        self,
        epoch: int,
        batch_size: int,
        rng: random.Random,
        src_vocab: Vocab,
        tgt_vocab: Vocab,
        limit: int = 0,
    ) -> list[Batch]:
        """Shuffled batches of every (image, caption) pair: images (B, C, H, W), tgt_in/tgt_out (B, T)."""
        pairs = [(i, r) for i, e in enumerate(self._splits["train"]) for r in e.references][: limit or None]
        rng.shuffle(pairs)
        batches = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            targets = target_arrays([tgt_vocab.encode(r) for _, r in chunk], tgt_vocab)
            batches.append({"images": self._pixels["train"][[i for i, _ in chunk]], **targets})
        return batches
