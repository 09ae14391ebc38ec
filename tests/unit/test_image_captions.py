"""Your own images and captions: reading the folder, splits, and what the data fixes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from attnserve.models.tasks.image_captions import ImageCaptionTask
from tests.conftest import BYOM_IMAGES


@pytest.fixture(scope="module")
def task() -> ImageCaptionTask:
    return ImageCaptionTask(BYOM_IMAGES)


def test_every_image_lands_in_one_split_as_rgb_pixels(task):
    lines = [line for line in BYOM_IMAGES.read_text().splitlines() if line and not line.startswith("#")]
    names = [e.source[0] for split in ("train", "dev", "test") for e in task.examples(split)]
    assert sorted(names) == sorted(line.split("\t")[0] for line in lines)
    batch = task.source_batches("test", 5, 5, task.vocabularies()[0])[0].inputs["images"]
    assert batch.shape == (5, 3, 56, 56) and batch.min() >= 0 and batch.max() <= 1
    assert np.allclose(batch[:, 0], batch[:, 2])  # grey PNGs read as RGB
    assert task.model_fields() == {"image_size": 56, "image_channels": 3}


def test_training_batches_pair_each_image_with_its_caption(task):
    import random

    src, tgt = task.vocabularies()
    batches = task.train_batches(1, 16, random.Random(0), src, tgt)
    assert sum(len(b["images"]) for b in batches) == len(task.examples("train"))
    first = batches[0]
    assert first["images"].shape[1:] == (3, 56, 56) and first["tgt_in"].shape == first["tgt_out"].shape
    assert (first["tgt_in"][:, 0] == tgt.bos_id).all()


def _copy_example(tmp_path, extra_line: str):
    shutil.copytree(BYOM_IMAGES.parent, tmp_path / "data")
    tsv = tmp_path / "data" / BYOM_IMAGES.name
    tsv.write_text(tsv.read_text() + extra_line)
    return tsv


def test_a_missing_image_is_named(tmp_path):
    tsv = _copy_example(tmp_path, "images/nope.png\ta bag top left\n")
    with pytest.raises(ValueError, match=r"cannot read .*nope\.png"):
        ImageCaptionTask(tsv)


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    tsv = _copy_example(tmp_path, "captions.tsv\ta bag top left\n")
    with pytest.raises(ValueError, match=r"captions\.tsv: not an image"):
        ImageCaptionTask(tsv)


def test_a_model_config_that_contradicts_the_data_is_refused(task, tmp_path):
    from attnserve.models.train import TrainConfig, train

    with pytest.raises(ValueError, match="image_size"):
        train(tmp_path, task, "captioner-lstm", {"image_size": 64}, TrainConfig(epochs=1))
