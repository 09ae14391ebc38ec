"""Caption training on images as clients send them: read back by the service's own decode_image."""

import random

import numpy as np
import pytest

from attnserve.core.images import decode_image
from attnserve.core.manifest import ImageSpec
from attnserve.models.client_images import encode, random_encoding
from attnserve.models.tasks.caption import CaptionTask, client_round_trip


def _batches(client_images: float) -> list[dict]:
    the_task = CaptionTask(max_shift=2, client_images=client_images)
    src, tgt = the_task.vocabularies()
    return the_task.train_batches(3, 32, random.Random(0), src, tgt, limit=96)


def test_round_tripped_scenes_keep_their_captions_and_stay_close():
    plain, sent = _batches(0.0), _batches(1.0)
    for a, b in zip(plain, sent, strict=True):
        assert b["images"].shape == a["images"].shape and b["images"].dtype == np.float32
        assert np.array_equal(a["tgt_out"], b["tgt_out"])
        assert b["images"].min() >= 0.0 and b["images"].max() <= 1.0
    plain_images = np.concatenate([b["images"] for b in plain])
    sent_images = np.concatenate([b["images"] for b in sent])
    changed = np.abs(sent_images - plain_images).reshape(len(plain_images), -1).max(1) > 1e-6
    assert changed.mean() > 0.9  # nearest-neighbour PNGs of sides that are multiples of 56 come back exact
    assert np.abs(sent_images - plain_images).mean() < 0.05


def test_the_share_asked_for_is_round_tripped_and_the_rest_untouched():
    images = np.random.default_rng(0).random((400, 1, 56, 56)).astype(np.float32)
    out = client_round_trip(images, 0.25, np.random.default_rng(1))
    changed = (np.abs(out - images).reshape(400, -1).max(1) > 1e-6).mean()
    assert 0.15 < changed < 0.3
    assert client_round_trip(images, 0.0, np.random.default_rng(1)) is images


def test_training_reads_an_image_exactly_as_the_service_does():
    images = np.random.default_rng(0).random((1, 1, 56, 56)).astype(np.float32)
    out = client_round_trip(images, 1.0, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    rng.random(1)  # the draw that chose which images to send
    served = decode_image(encode(images[0, 0], random_encoding(rng)), ImageSpec(56, 56, 1, 14, 14))
    assert np.array_equal(out[0], served)


def test_client_images_is_a_recorded_fraction():
    assert CaptionTask(max_shift=2, client_images=0.5).arguments == {"max_shift": 2, "client_images": 0.5}
    assert CaptionTask().arguments == {}
    with pytest.raises(ValueError, match="fraction"):
        CaptionTask(client_images=1.5)
