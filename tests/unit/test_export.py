"""Export: PyTorch vs ONNX Runtime parity, the manifest against the graph, no silent overwrite."""

import json
import shutil

import numpy as np
import onnx
import pytest

from attnserve.core.manifest import Manifest, ManifestError
from attnserve.core.onnx_model import OnnxSeq2Seq
from attnserve.export.parity import check_parity
from attnserve.export.pipeline import ExportConfig, export_model
from attnserve.models.architectures import BAHDANAU, DYNAMIC_AXES
from attnserve.models.checkpoint import load_checkpoint
from attnserve.models.tasks import task
from attnserve.models.torch_runner import TorchStepModel

ONNX_DTYPES = {
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT: "float32",
}


def test_parity_on_batch_sizes_other_than_the_export_one(tiny_checkpoint, tiny_entry):
    model, src_vocab, _, _ = load_checkpoint(tiny_checkpoint)
    batches = task("g2p").source_batches("test", 400, 64, src_vocab)[3:]  # not the words the export checked
    probes = [task("g2p").source_batches("test", n, n, src_vocab)[0] for n in (2, 11, 64)]
    report = check_parity(
        TorchStepModel(model, BAHDANAU), OnnxSeq2Seq(Manifest.load(tiny_entry)), probes, batches, 1, 2, 32
    )
    assert report.max_abs_diff < 1e-4
    assert report.greedy_identical, report


@pytest.mark.parametrize("entry_fixture", ["tiny_entry", "bundled_manifest"])
def test_manifest_matches_the_onnx_graphs(entry_fixture, request):
    value = request.getfixturevalue(entry_fixture)
    manifest = value if isinstance(value, Manifest) else Manifest.load(value)
    for spec in (manifest.encoder, manifest.decoder_step):
        graph = onnx.load(manifest.path / spec.file).graph
        for declared, actual in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
            assert [t.name for t in declared] == [v.name for v in actual]
            for t, v in zip(declared, actual, strict=True):
                assert ONNX_DTYPES[v.type.tensor_type.elem_type] == t.dtype
                dims = v.type.tensor_type.shape.dim
                assert len(dims) == len(t.shape)
                for want, dim in zip(t.shape, dims, strict=True):
                    if want in DYNAMIC_AXES:
                        assert dim.dim_param, f"{v.name}: axis {want} must be dynamic"
    recorded = manifest.raw["export"]["parity"]
    assert recorded["max_abs_diff"] < 1e-4
    assert recorded["greedy_matches"] == recorded["greedy_examples"] >= 200


def test_export_refuses_to_overwrite_without_force(tiny_checkpoint, tiny_entry):
    cfg = ExportConfig(tiny_checkpoint, tiny_entry.parent.parent, "tiny-g2p", eval_limit=50)
    with pytest.raises(FileExistsError, match="--force"):
        export_model(cfg)


def test_manifest_detects_a_tampered_graph(tiny_entry, tmp_path):
    copy = tmp_path / "entry"
    shutil.copytree(tiny_entry, copy)
    with open(copy / "decoder_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.load(copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["format_revision"] = 99
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="revision"):
        Manifest.load(copy)


def test_checkpoint_round_trip_keeps_weights(tiny_checkpoint):
    model, src_vocab, tgt_vocab, payload = load_checkpoint(tiny_checkpoint)
    again, *_ = load_checkpoint(tiny_checkpoint)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert payload["architecture"] == "bahdanau-gru" and len(src_vocab) > 26 and len(tgt_vocab) > 30


def test_tied_output_layer_is_stored_once(tiny_transformer_entry):
    """The decoder step holds the target embedding once: its output layer must not add a transpose."""
    manifest = Manifest.load(tiny_transformer_entry)
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(manifest.path / "decoder_step.onnx").graph.initializer
    ]
    vocab = len(manifest.target_vocab)
    tables = [w for w in weights if w.ndim == 2 and vocab in w.shape]
    assert len(tables) == 1, [w.shape for w in tables]
