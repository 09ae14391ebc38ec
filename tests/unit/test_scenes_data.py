"""Fashion-MNIST scenes: reproducible, splits disjoint, captions true to the canvas; the scorers."""

import numpy as np
import pytest

from attnserve.models.caption_scoring import attention_localisation, exact_match, grid_cell_centre
from attnserve.models.scenes_data import (
    CANVAS,
    CLASS_NAMES,
    POSITIONS,
    augment_cells,
    caption_of,
    caption_vocab,
    cell_box,
    generate,
    load_fashion_mnist,
    split_indices,
)

GRID = (14, 14)


def test_same_arguments_same_scenes_other_seed_other_scenes():
    a, b, c = generate("train", 50, seed=3), generate("train", 50, seed=3), generate("train", 50, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert [s.caption for s in a] != [s.caption for s in c]
    assert [s.caption for s in generate("dev", 50, seed=3)] != [s.caption for s in a]


def test_splits_are_disjoint_and_test_images_are_unseen():
    (train_part, train), (dev_part, dev), (test_part, test) = (
        split_indices(s) for s in ("train", "dev", "test")
    )
    assert train_part == dev_part == "train" and test_part == "t10k"
    assert not set(train) & set(dev)
    assert len(train) + len(dev) == 60000 and 0.94 < len(train) / 60000 < 0.96
    assert len(test) == 10000
    for split, pool in (("train", train), ("dev", dev), ("test", test)):
        used = {item.source_index for s in generate(split, 300, seed=0) for item in s.items}
        assert used <= set(pool.tolist()), split
    train_images = {img.tobytes() for img in load_fashion_mnist("train")[0]}
    assert not any(img.tobytes() in train_images for img in load_fashion_mnist("t10k")[0])


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_name_what_the_canvas_shows(split):
    images, labels = load_fashion_mnist("t10k" if split == "test" else "train")
    scenes = generate(split, 400, seed=1)
    assert {len(s.items) for s in scenes} == {1, 2, 3, 4}
    for s in scenes:
        assert s.image.shape == (CANVAS, CANVAS) and s.image.dtype == np.float32
        assert s.image.min() >= 0 and s.image.max() <= 1
        cells = [item.cell for item in s.items]
        assert cells == sorted(set(cells)), "items in reading order, distinct cells"
        expected: list[str] = []
        for item in s.items:
            assert item.label == labels[item.source_index]
            assert item.box == cell_box(item.cell)
            r0, c0, r1, c1 = item.box
            np.testing.assert_allclose(s.image[r0:r1, c0:c1], images[item.source_index] / 255, atol=1e-6)
            name = CLASS_NAMES[item.label].split()
            assert [s.caption[t] for t in item.name_tokens] == name
            expected += ["and"] * bool(expected) + ["a", *name, *POSITIONS[item.cell].split()]
        assert list(s.caption) == expected
        for cell in set(range(4)) - set(cells):
            r0, c0, r1, c1 = cell_box(cell)
            assert not s.image[r0:r1, c0:c1].any(), "empty cells are black"


def test_caption_grammar_and_vocabulary():
    tokens, names = caption_of([(7, 3), (8, 0)])  # a sneaker bottom right, a bag top left
    assert " ".join(tokens) == "a bag top left and a sneaker bottom right"
    assert names == ((6,), (1,))
    tokens, names = caption_of([(9, 1)])
    assert tokens == ("a", "ankle", "boot", "top", "right") and names == ((1, 2),)
    vocab = caption_vocab()
    assert len(set(vocab)) == len(vocab) == 17 and vocab == caption_vocab()
    assert {t for s in generate("train", 500, seed=2) for t in s.caption} == set(vocab)
    with pytest.raises(ValueError, match="distinct cells"):
        caption_of([(1, 0), (2, 0)])
    with pytest.raises(ValueError, match="unknown split"):
        generate("validation", 1, seed=0)


def test_exact_match():
    assert exact_match([["a", "bag"], ["a", "coat"]], [("a", "bag"), ("a", "dress")]) == 0.5
    assert exact_match([["a", "bag", "top"]], [("a", "bag")]) == 0.0
    with pytest.raises(ValueError):
        exact_match([], [])


def _maps(scene, cell_for_item, grid=GRID) -> np.ndarray:
    """A (T, N) map peaked, at every class-name token, on the grid cell chosen for its item."""
    attention = np.full((len(scene.caption) + 1, grid[0] * grid[1]), 1e-3, dtype=np.float32)
    for item in scene.items:
        for t in item.name_tokens:
            attention[t, cell_for_item(item)] = 1.0
    return attention


def _cell_inside(box, grid=GRID) -> int:
    """A grid cell whose centre lies in the box (the one nearest the box centre)."""
    centres = [grid_cell_centre(n, grid, (CANVAS, CANVAS)) for n in range(grid[0] * grid[1])]
    r, c = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return int(np.argmin([(y - r) ** 2 + (x - c) ** 2 for y, x in centres]))


def test_localisation_perfect_wrong_and_uncounted_maps():
    scenes = [s for s in generate("test", 40, seed=5) if len(s.items) >= 2][:6]
    refs = [list(s.caption) for s in scenes]
    perfect = [_maps(s, lambda item: _cell_inside(item.box)) for s in scenes]
    # Each item's words look at the next item's cell (another cell of the scene).
    wrong = [
        _maps(s, lambda item, s=s: _cell_inside(s.items[(s.items.index(item) + 1) % len(s.items)].box))
        for s in scenes
    ]
    assert attention_localisation(scenes, refs, perfect, GRID) == 1.0
    assert attention_localisation(scenes, refs, wrong, GRID) == 0.0
    # Scenes whose caption is wrong count nothing, whatever their maps.
    bad = [[*r[:-1], "left" if r[-1] == "right" else "right"] for r in refs]
    half = [perfect[i] if i % 2 else wrong[i] for i in range(len(scenes))]
    mixed_preds = [refs[i] if i % 2 else bad[i] for i in range(len(scenes))]
    assert attention_localisation(scenes, mixed_preds, half, GRID) == 1.0
    assert attention_localisation(scenes, bad, perfect, GRID) == 0.0
    # The score counts tokens: "ankle boot" is two tokens, one of them wrong here.
    boot = next(s for s in generate("test", 200, seed=6) if len(s.items) == 1 and s.items[0].label == 9)
    other = _cell_inside(cell_box((boot.items[0].cell + 1) % 4))
    attention = _maps(boot, lambda item: _cell_inside(item.box))
    attention[boot.items[0].name_tokens[1]] = np.eye(GRID[0] * GRID[1])[other]
    assert attention_localisation([boot], [list(boot.caption)], [attention], GRID) == 0.5
    with pytest.raises(ValueError, match="does not fit"):
        attention_localisation([boot], [list(boot.caption)], [attention[:, :10]], GRID)


def test_grid_cell_centres_never_sit_on_a_cell_border():
    centres = [grid_cell_centre(n, GRID, (CANVAS, CANVAS)) for n in range(GRID[0] * GRID[1])]
    assert centres[0] == (2.0, 2.0) and centres[-1] == (54.0, 54.0)
    assert all(y != CANVAS / 2 and x != CANVAS / 2 for y, x in centres)


@pytest.mark.parametrize("max_shift", [0, 2])
def test_augmented_cells_keep_their_item_in_place(max_shift):
    scenes = generate("train", 64, seed=5)
    images = np.stack([s.image for s in scenes])[:, None]  # (64, 1, 56, 56)
    augmented = augment_cells(images, np.random.default_rng(0), max_shift)
    assert augmented.shape == images.shape
    shifts = range(-max_shift, max_shift + 1)
    changed = 0
    for scene, before, after in zip(scenes, images[:, 0], augmented[:, 0], strict=True):
        for item in scene.items:
            r0, c0, r1, c1 = item.box
            cell, got = before[r0:r1, c0:c1], after[r0:r1, c0:c1]
            # The cell holds its own item, maybe mirrored, maybe rolled: nothing crosses cells.
            candidates = [
                np.roll(c, (dy, dx), (0, 1)) for c in (cell, cell[:, ::-1]) for dy in shifts for dx in shifts
            ]
            assert any(np.array_equal(got, c) for c in candidates)
            changed += not np.array_equal(got, cell)
    assert 0.3 < changed / sum(len(s.items) for s in scenes) < (0.7 if max_shift == 0 else 1.0)
