"""Every bundled model, re-evaluated through the serving runtime, must match its manifest and targets."""

import pytest

from attnserve.core.manifest import discover
from attnserve.core.onnx_model import OnnxSeq2Seq
from attnserve.models.tasks import task
from tests.conftest import BUNDLED_REPOSITORY

TOLERANCE = 0.01  # one point
# The targets: (metric, bound, "max" if the figure must stay at or below the bound).
TARGETS = {
    "g2p-bahdanau": {"test": [("wer", 0.35, "max"), ("per", 0.09, "max")]},
    "g2p-transformer": {"test": [("wer", 0.30, "max"), ("per", 0.075, "max")]},
    "dates-luong": {
        "test": [("exact_match", 0.994, "min")],
        "test_typed": [("exact_match", 0.99, "min")],
        "test_unseen_locales": [("exact_match", 0.856, "min")],
    },
    "caption-fashion": {"test": [("exact_match", 0.85, "min"), ("localisation", 0.90, "min")]},
    "en-fr-transformer": {"test": [("bleu", 15.0, "min")]},
}
ENTRIES = {m.name: m for m in discover(BUNDLED_REPOSITORY)}


def test_every_bundled_model_has_targets():
    assert set(ENTRIES) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_bundled_model_meets_targets_and_its_manifest(name):
    m = ENTRIES[name]
    the_task, model = task(m.task, **m.raw.get("task_args", {})), OnnxSeq2Seq(m)
    for split in the_task.eval_splits:
        recorded = m.metrics[split]
        got = the_task.evaluate_model(model, split, m.source_vocab, m.target_vocab)
        assert got.keys() == recorded.keys(), "manifest figures must cover the whole split"
        for key, value in got.items():
            assert abs(value - recorded[key]) <= TOLERANCE * max(1.0, abs(recorded[key])), (
                split,
                got,
                recorded,
            )
        for metric, bound, kind in TARGETS[name].get(split, []):
            assert got[metric] <= bound if kind == "max" else got[metric] >= bound, (split, metric, got)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_bundled_model_is_small_and_records_its_training(name):
    m = ENTRIES[name]
    size = sum(f.stat().st_size for f in m.path.iterdir())
    assert size < 40 * 2**20, f"bundled entry is {size / 2**20:.1f} MiB"  # EN-FR: 34 MiB, fp32
    assert m.raw["training"]["seconds"] > 0 and m.raw["training"]["hardware"]
