"""Captioned scenes composed from Fashion-MNIST images (no torch).

A scene is a 56x56 canvas: a 2x2 grid of 28x28 cells (top left, top right, bottom left, bottom
right), 1 to 4 of them (uniformly many, in random distinct cells) holding a Fashion-MNIST image,
the rest black. The caption names every item in reading order, exactly:

    "a bag top left and a sneaker bottom right"

i.e. items `a <class> <row> <column>` joined by `and`, tokenised on whitespace (so "ankle boot"
is two tokens). The images come from the Debian package `fashion-mnist`: train and dev scenes
use the training file, split 95/5 by a hash of the image index; test scenes use only the t10k
file, so held-out scenes show images no model trained on.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "dev", "test")
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells in reading order
CELL = 28  # cell side in pixels, the size of a Fashion-MNIST image
CANVAS = 2 * CELL
MAX_ITEMS = len(POSITIONS)


@dataclass(frozen=True)
class SceneItem:
    """One image in a scene: its class, cell, pixel box and the caption tokens naming it."""

    label: int  # index into CLASS_NAMES
    cell: int  # index into POSITIONS
    box: tuple[int, int, int, int]  # (row0, col0, row1, col1): pixels row0 <= r < row1, col0 <= c < col1
    name_tokens: tuple[int, ...]  # caption indices of the class-name tokens ("ankle boot" has two)
    source_index: int  # index of the image in its Fashion-MNIST file


@dataclass(frozen=True, eq=False)
class Scene:
    """A canvas (56, 56) float32 in [0, 1], its caption tokens and its items in caption order."""

    image: np.ndarray
    caption: tuple[str, ...]
    items: tuple[SceneItem, ...]


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """The (row0, col0, row1, col1) pixel box of a cell (0..3 in reading order)."""
    r, c = divmod(cell, 2)
    return (r * CELL, c * CELL, (r + 1) * CELL, (c + 1) * CELL)


def caption_vocab() -> tuple[str, ...]:
    """Every token a caption can contain, in a fixed order (grammar words, classes, positions)."""
    tokens = ["a", "and"]
    for phrase in CLASS_NAMES + POSITIONS:
        tokens += [t for t in phrase.split() if t not in tokens]
    return tuple(tokens)


def caption_of(labels_and_cells) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """Caption tokens for (label, cell) pairs, and the caption indices naming each pair's class.

    Args:
        labels_and_cells: (label, cell) pairs with distinct cells, in any order.

    Returns:
        (tokens, name token indices per pair); the caption lists the pairs in reading order, the
        indices follow the order of the argument.

    Raises:
        ValueError: for an empty list, repeated cells or out-of-range labels or cells.
    """
    pairs = [(int(label), int(cell)) for label, cell in labels_and_cells]
    cells = [cell for _, cell in pairs]
    if not pairs or len(set(cells)) != len(cells):
        raise ValueError(f"need 1 to {MAX_ITEMS} items in distinct cells, got cells {cells}")
    if not all(0 <= label < len(CLASS_NAMES) and 0 <= cell < MAX_ITEMS for label, cell in pairs):
        raise ValueError(f"label or cell out of range in {pairs}")
    tokens: list[str] = []
    names: dict[int, tuple[int, ...]] = {}
    for label, cell in sorted(pairs, key=lambda p: p[1]):
        if tokens:
            tokens.append("and")
        tokens.append("a")
        name = CLASS_NAMES[label].split()
        names[cell] = tuple(range(len(tokens), len(tokens) + len(name)))
        tokens += name + POSITIONS[cell].split()
    return tuple(tokens), tuple(names[cell] for cell in cells)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array of the shape its header gives.

    Raises:
        ValueError: if the header is not an unsigned-byte IDX header or the size disagrees.
    """
    raw = gzip.decompress(path.read_bytes())
    zero, dtype, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


@cache
def load_fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of "train" or "t10k", read once per process."""
    images = _read_idx(DATA_DIR / f"{part}-images-idx3-ubyte.gz")
    labels = _read_idx(DATA_DIR / f"{part}-labels-idx1-ubyte.gz")
    if images.shape[1:] != (CELL, CELL) or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST {part} shapes {images.shape}, {labels.shape}")
    return images, labels


def image_split(index: int) -> str:
    """train / dev for an image of the training file: 95/5 by a hash of its index."""
    bucket = int(hashlib.sha256(f"fashion-mnist:{index}".encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 95 else "dev"


@cache
def split_indices(split: str) -> tuple[str, np.ndarray]:
    """(file part, sorted image indices) that scenes of a split draw from.

    Raises:
        ValueError: for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split == "test":
        part, indices = "t10k", np.arange(len(load_fashion_mnist("t10k")[1]))
    else:
        n = len(load_fashion_mnist("train")[1])
        part, indices = "train", np.array([i for i in range(n) if image_split(i) == split])
    indices.flags.writeable = False  # shared by every caller
    return part, indices


def generate(split: str, count: int, seed: int) -> list[Scene]:
    """`count` random scenes of one split, reproducibly.

    Each scene has 1 to 4 items (each count equally likely) in distinct random cells; each item
    is an image drawn uniformly from the split's images. The canvases of one call share one
    (count, 56, 56) array, so `np.stack` of them is cheap.

    Args:
        split: "train", "dev" or "test".
        count: number of scenes.
        seed: the sampling seed (the same arguments always give the same scenes).

    Raises:
        ValueError: for an unknown split or a negative count.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    part, pool = split_indices(split)
    images, labels = load_fashion_mnist(part)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n_items = rng.integers(1, MAX_ITEMS + 1, size=count)  # (count,)
    cells = rng.random((count, MAX_ITEMS)).argsort(axis=1)  # (count, 4) random permutations
    sources = pool[rng.integers(0, len(pool), size=(count, MAX_ITEMS))]  # (count, 4)
    present = np.arange(MAX_ITEMS)[None, :] < n_items[:, None]  # (count, 4): slot k holds an item

    canvas = np.zeros((count, 2, CELL, 2, CELL), dtype=np.float32)  # (count, row, y, column, x)
    for k in range(MAX_ITEMS):
        rows = np.flatnonzero(present[:, k])
        r, c = np.divmod(cells[rows, k], 2)
        canvas[rows, r, :, c, :] = images[sources[rows, k]] / np.float32(255)
    canvas = canvas.reshape(count, CANVAS, CANVAS)  # (count, 56, 56)

    scenes = []
    for i in range(count):
        slots = range(int(n_items[i]))
        pairs = [(int(labels[sources[i, k]]), int(cells[i, k])) for k in slots]
        tokens, names = caption_of(pairs)
        items = [
            SceneItem(label, cell, cell_box(cell), name, int(sources[i, k]))
            for k, (label, cell), name in zip(slots, pairs, names, strict=True)
        ]
        items.sort(key=lambda item: item.cell)
        scenes.append(Scene(canvas[i], tokens, tuple(items)))
    return scenes


def augment_cells(images: np.ndarray, rng: np.random.Generator, max_shift: int = 0) -> np.ndarray:
    """Mirrors each cell of scene canvases (B, 1, 56, 56) left to right with probability 1/2 and,
    with max_shift, rolls its content by up to that many pixels along each axis (within the cell)."""
    batch = len(images)
    cells = images.reshape(batch, 2, CELL, 2, CELL).transpose(0, 1, 3, 2, 4)  # (B, row, column, y, x)
    flip = rng.random((batch, 2, 2, 1, 1)) < 0.5
    cells = np.where(flip, cells[..., ::-1], cells)
    if max_shift:
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, batch, 2, 2, 1, 1))
        cells = np.take_along_axis(cells, (np.arange(CELL)[:, None] - dy) % CELL, axis=3)  # rows
        cells = np.take_along_axis(cells, (np.arange(CELL) - dx) % CELL, axis=4)  # columns
    return np.ascontiguousarray(cells.transpose(0, 1, 3, 2, 4)).reshape(images.shape)
