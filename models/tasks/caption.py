"""The image-captioning task: Fashion-MNIST scenes, exact captions, attention localisation."""

from __future__ import annotations

import random
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from attnserve.core.decoding import StepModel, decode
from attnserve.core.images import decode_image
from attnserve.core.manifest import ImageSpec
from attnserve.core.sources import SourceBatch
from attnserve.core.vocab import SPECIALS, Vocab
from attnserve.models import scenes_data
from attnserve.models.caption_scoring import attention_localisation, exact_match
from attnserve.models.client_images import encode, random_encoding
from attnserve.models.tasks.base import Batch, TextTask, target_arrays


class CaptionTask(TextTask):
    """Scenes of one to four Fashion-MNIST items -> "a bag top left and a sneaker bottom right".

    Training scenes are composed afresh every epoch from the training images; dev scenes use
    held-out training images and test scenes only the Fashion-MNIST test images.
    """

    name = "caption"
    description = "Scene of 1-4 Fashion-MNIST items on a 2x2 canvas -> caption naming each item and its place"
    max_source_tokens = 0
    max_output_tokens = 32
    primary, minimise = "exact_match", False
    sizes: ClassVar[dict[str, int]] = {"train": 40_000, "dev": 1_000, "test": 2_000}

    def __init__(self, train_examples: int = 0, max_shift: int = 0, client_images: float = 0.0):
        if not 0.0 <= client_images <= 1.0:
            raise ValueError(f"client_images is a fraction of the training scenes, got {client_images}")
        self.train_size = train_examples or self.sizes["train"]
        self.max_shift = max_shift  # training items move up to this many pixels within their cell
        self.client_images = client_images  # share of training scenes sent as a client would send them

    @property
    def arguments(self) -> dict:
        given = {"max_shift": self.max_shift, "client_images": self.client_images}
        return {name: value for name, value in given.items() if value}

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """No source tokens (the source is pixels); the caption grammar's words."""
        return Vocab(SPECIALS), Vocab.build([scenes_data.caption_vocab()])

    def model_fields(self) -> dict:
        return {"image_size": scenes_data.CANVAS, "image_channels": 1}

    def source_section(self, src_vocab: Vocab, config) -> dict:
        return image_source_section(src_vocab, config)

    def _scenes(self, split: str, limit: int = 0) -> list[scenes_data.Scene]:
        return scenes_data.generate(split, min(limit or self.sizes[split], self.sizes[split]), seed=0)

    def source_batches(self, split: str, count: int, batch_size: int, src_vocab: Vocab) -> list[SourceBatch]:
        scenes = self._scenes(split, count)
        pixels = _pixels(scenes)  # (N, 1, 56, 56)
        return [
            SourceBatch.from_images(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)
        ]

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
        """Exact caption match and attention localisation on a split's scenes."""
        scenes = self._scenes(split, limit)
        preds, maps = caption_images(
            model, _pixels(scenes), tgt_vocab, self.max_output_tokens, beam_size, progress
        )
        grid = _grid_of(maps[0].shape[1])
        return {
            "exact_match": exact_match(preds, [s.caption for s in scenes]),
            "localisation": attention_localisation(scenes, preds, maps, grid),
            "examples": float(len(scenes)),
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
        """Batches of fresh scenes: images (B, 1, 56, 56) and tgt_in/tgt_out (B, T).

        Each cell is mirrored left to right with probability 1/2 (no class depends on it) and,
        with max_shift, its content rolled by up to that many pixels; with client_images, that
        share of the scenes is then sent through a random client's round trip (`client_round_trip`).
        """
        scenes = scenes_data.generate("train", limit or self.train_size, seed=epoch)
        augment, clients = np.random.default_rng([epoch, 1]), np.random.default_rng([epoch, 2])
        batches = []
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            targets = target_arrays([tgt_vocab.encode(s.caption) for s in chunk], tgt_vocab)
            images = scenes_data.augment_cells(_pixels(chunk), augment, self.max_shift)  # (B, 1, 56, 56)
            if self.client_images:
                images = client_round_trip(images, self.client_images, clients)
            batches.append({"images": images, **targets})
        return batches


def client_round_trip(images: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Scene canvases (B, 1, H, W) with about `share` of them as the service would read them from a
    random client (resized 28..448 px by any method, PNG or JPEG q70..95, grey or RGB): encoded by
    `client_images.encode`, then decoded by the service's own `decode_image`."""
    spec = ImageSpec(images.shape[2], images.shape[3], images.shape[1], 0, 0)
    chosen = np.flatnonzero(rng.random(len(images)) < share)
    if not len(chosen):
        return images
    images = images.copy()
    for i in chosen:
        images[i] = decode_image(encode(images[i, 0], random_encoding(rng)), spec)  # (1, H, W)
    return images


def image_source_section(src_vocab: Vocab, config) -> dict:
    """The manifest's `source` for an image model: input size and channels, attention grid."""
    size = config.image_size
    return {"kind": "image", "height": size, "width": size, "channels": config.image_channels,
            "grid": [config.grid_height, config.grid_width], "vocab": list(src_vocab.tokens),
            "max_tokens": 0}  # fmt: skip


def caption_images(
    model: StepModel,
    pixels: np.ndarray,
    tgt_vocab: Vocab,
    max_tokens: int,
    beam_size: int = 1,
    progress: bool = False,
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Captions (N, C, H, W) images in batches of 256: (words, attention (T, cells)) per image."""
    preds, maps = [], []
    for start in tqdm(range(0, len(pixels), 256), desc="decode", unit="batch", disable=not progress):
        chunk = pixels[start : start + 256]
        hyps = decode(model, SourceBatch.from_images(chunk), tgt_vocab.bos_id, tgt_vocab.eos_id,
                      [max_tokens] * len(chunk), beam_size)  # fmt: skip
        preds += [tgt_vocab.decode(h.token_ids) for h in hyps]
        maps += [h.attention for h in hyps]
    return preds, maps


def _pixels(scenes: list[scenes_data.Scene]) -> np.ndarray:
    """The scenes' canvases as encoder input (B, 1, 56, 56)."""
    return np.stack([s.image for s in scenes])[:, None]  # (B, 1, H, W)


def _grid_of(cells: int) -> tuple[int, int]:
    side = round(cells**0.5)
    return side, side
