"""The bundled model, re-evaluated through the serving runtime, must match its manifest."""

from attnserve.models.evaluate import evaluate_g2p
from attnserve.models.g2p_data import load_split
from attnserve.service.runtime.onnx_model import OnnxSeq2Seq

TOLERANCE = 0.01  # one point


def test_bundled_model_meets_targets_and_its_manifest(bundled_manifest):
    m = bundled_manifest
    recorded = m.metrics["test"]
    entries = load_split("test")
    assert int(recorded["words"]) == len(entries), "manifest figures must cover the whole test split"
    got = evaluate_g2p(OnnxSeq2Seq(m), entries, m.source_vocab, m.target_vocab, m.max_output_tokens)
    assert abs(got["wer"] - recorded["wer"]) <= TOLERANCE, (got, recorded)
    assert abs(got["per"] - recorded["per"]) <= TOLERANCE, (got, recorded)
    assert got["wer"] <= 0.35 and got["per"] <= 0.09, got  # the targets


def test_bundled_model_is_small(bundled_manifest):
    size = sum(f.stat().st_size for f in bundled_manifest.path.iterdir())
    assert size < 20 * 2**20, f"bundled entry is {size / 2**20:.1f} MiB"
