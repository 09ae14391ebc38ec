"""int8 variants: quantised graphs beside the float ones, their quality measured, precision chosen."""

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnserve.core.manifest import Manifest, ManifestError
from attnserve.core.onnx_model import OnnxSeq2Seq, RuntimeConfig, choose_precision
from attnserve.export.quantize import QUALITY_LOSS_LIMIT, quality_loss

rates = st.floats(0, 1, allow_nan=False)


@given(rates, rates)
def test_quality_loss_counts_worse_as_positive_points_in_either_direction(base, other):
    loss = quality_loss({"wer": base, "exact_match": base, "bleu": 100 * base, "words": 10.0},
                        {"wer": other, "exact_match": other, "bleu": 100 * other, "words": 10.0})  # fmt: skip
    assert set(loss) == {"wer", "exact_match", "bleu"}  # counts are not quality
    assert loss["wer"] == pytest.approx(100 * (other - base))  # an error rate: higher is worse
    assert loss["exact_match"] == pytest.approx(100 * (base - other))  # a score: lower is worse
    assert loss["bleu"] == pytest.approx(loss["exact_match"])  # already in points


def test_export_records_a_checksummed_int8_variant_with_its_figures(tiny_entry):
    manifest = Manifest.load(tiny_entry)
    int8 = manifest.raw["variants"]["int8"]
    assert {int8["graphs"][g]["file"] for g in int8["graphs"]} == {
        "encoder.int8.onnx",
        "decoder_step.int8.onnx",
    }
    assert int8["metrics"]["test"]["words"] == int8["fp32_metrics"]["test"]["words"] > 0
    assert int8["qualifies"] == (max(int8["quality_loss"]["test"].values()) <= QUALITY_LOSS_LIMIT)
    smaller = [(tiny_entry / v.file).stat().st_size < (tiny_entry / f.file).stat().st_size
               for v, f in ((manifest.variants["int8"].encoder, manifest.encoder),
                            (manifest.variants["int8"].decoder_step, manifest.decoder_step))]  # fmt: skip
    assert all(smaller)


def test_precision_picks_the_graphs_and_auto_follows_the_recorded_verdict(tiny_entry, tmp_path):
    copy = tmp_path / "entry"
    shutil.copytree(tiny_entry, copy)
    assert OnnxSeq2Seq(Manifest.load(copy), RuntimeConfig(precision="int8")).precision == "int8"
    assert OnnxSeq2Seq(Manifest.load(copy), RuntimeConfig(precision="fp32")).precision == "fp32"
    raw = json.loads((copy / "manifest.json").read_text())
    for verdict in (True, False):
        raw["variants"]["int8"]["qualifies"] = verdict
        (copy / "manifest.json").write_text(json.dumps(raw))
        assert choose_precision(Manifest.load(copy), "auto") == ("int8" if verdict else "fp32")
    del raw["variants"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    assert choose_precision(Manifest.load(copy), "auto") == "fp32"
    with pytest.raises(ManifestError, match=r"no int8 variant.*attnserve quantize"):
        OnnxSeq2Seq(Manifest.load(copy), RuntimeConfig(precision="int8"))


def test_a_tampered_int8_graph_is_refused(tiny_entry, tmp_path):
    copy = tmp_path / "entry"
    shutil.copytree(tiny_entry, copy)
    with open(copy / "decoder_step.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"decoder_step.int8.onnx: sha256"):
        Manifest.load(copy)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision"):
        RuntimeConfig(precision="fp16")
