"""Re-export from an entry's weights: every parameter is found in the graphs, revisions are checked."""

import json
import shutil

import numpy as np
import pytest
import torch

from attnserve.core.manifest import Manifest, ManifestError, sha256_of
from attnserve.core.sources import SourceBatch
from attnserve.export.from_entry import graph_weights, rebuild, trace_unnamed
from attnserve.export.onnx_graphs import export_graph
from attnserve.export.pipeline import checkpoint_from_entry
from attnserve.models.architectures import TRANSFORMER, architecture
from attnserve.models.checkpoint import load_checkpoint
from attnserve.models.transformer import TransformerConfig, TransformerSeq2Seq
from tests.conftest import BUNDLED_REPOSITORY, bundled_entry

CONFIG = dict(src_vocab_size=11, tgt_vocab_size=9, d_model=16, heads=2, encoder_layers=2, decoder_layers=2,
              ff_size=24, max_positions=16)  # fmt: skip
TEXT = [("src_ids", "int64", ["batch", "src_len"]), ("src_mask", "bool", ["batch", "src_len"])]


@pytest.fixture(scope="module")
def revision_1_entry(tmp_path_factory):
    """An entry laid out as revision 1 wrote it: an encoder graph and a decoder graph whose Linear
    layers act on 3-D inputs (MatMul + Add, unnamed transposed weights). The teacher-forced pass is
    such a graph; the manifest is revision 1."""
    torch.manual_seed(4)
    model = TransformerSeq2Seq(TransformerConfig(**CONFIG)).eval()
    with torch.no_grad():  # as after training: no two layer norms alike (the exporter shares equal tensors)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("rev1") / "tiny" / "1"
    folder.mkdir(parents=True)
    src, mask = torch.randint(1, 11, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    tgt = torch.randint(1, 9, (2, 4))
    with torch.no_grad():
        outputs = TRANSFORMER.for_config(model.config).encoder_outputs
        export_graph(model, "encode", (src, mask), TEXT, outputs, folder / "encoder.onnx")
        export_graph(model, "forward", (src, mask, tgt), [*TEXT, ("tgt_in", "int64", ["batch", "next_len"])],
                     [("logits", "float32", [])], folder / "decoder_step.onnx")  # fmt: skip
    graphs = {g: {"file": f"{g}.onnx", "sha256": sha256_of(folder / f"{g}.onnx"), "inputs": [], "outputs": []}
              for g in ("encoder", "decoder_step")}  # fmt: skip
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *"abcdefg"]
    manifest = {
        "format_revision": 1, "name": "tiny", "version": "1", "task": "g2p", "architecture": "transformer",
        "source": {"vocab": vocab, "max_tokens": 8}, "target": {"vocab": vocab[:9], "max_tokens": 8},
        "graphs": graphs, "decoder": {}, "model_config": CONFIG,
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return model, folder


def test_every_parameter_is_found_in_the_graphs_by_name_or_by_its_bias(revision_1_entry):
    model, folder = revision_1_entry
    found = graph_weights(folder / "encoder.onnx", 8) | graph_weights(folder / "decoder_step.onnx", 8)
    state = model.state_dict()
    assert sorted(found) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(found[name], value.numpy(), err_msg=name)


def test_rebuild_restores_the_weights_and_the_task(revision_1_entry):
    model, folder = revision_1_entry
    rebuilt = rebuild(folder)
    for (name, want), got in zip(
        model.state_dict().items(), rebuilt.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert rebuilt.payload["meta"]["task"] == "g2p" and rebuilt.payload["config"] == CONFIG
    assert len(rebuilt.tgt_vocab) == 9


def test_a_revision_1_transformer_is_refused_with_the_command_that_re_exports_it(revision_1_entry):
    _, folder = revision_1_entry
    with pytest.raises(ManifestError, match=r"revision 1.*attnserve export --from-entry .*tiny/1 --force"):
        Manifest.load(folder)


def test_a_tampered_graph_is_not_rebuilt(revision_1_entry, tmp_path):
    _, folder = revision_1_entry
    copy = tmp_path / "tiny" / "1"
    shutil.copytree(folder, copy)
    with open(copy / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        rebuild(copy)


def test_revision_1_entries_of_the_rnn_families_still_load():
    manifest = Manifest.load(BUNDLED_REPOSITORY / "g2p-bahdanau" / "1")
    assert manifest.raw["format_revision"] == 1


def test_revision_2_graphs_give_back_the_weights_of_their_fused_query_key_value(revision_1_entry, tmp_path):
    model, _ = revision_1_entry
    arch = TRANSFORMER.for_config(model.config)
    src, mask = torch.randint(1, 11, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        encoded = model.encode(src, mask)
        past = [torch.randn(2, 2, 3, 8) for _ in range(4)]
        args = (torch.ones(2, dtype=torch.long), torch.tensor([1, 3]), *past, *encoded[1:5], mask)
        export_graph(
            model, "decode_step", args, arch.decoder_inputs, arch.decoder_outputs, tmp_path / "d.onnx"
        )
    found = graph_weights(tmp_path / "d.onnx", 8)
    for i in range(2):
        for name in ("q.weight", "q.bias", "k.weight", "v.bias"):
            key = f"decoder.{i}.self_attn.{name}"
            np.testing.assert_allclose(found[key], model.state_dict()[key].numpy(), rtol=1e-6, err_msg=key)


def test_bundled_transformers_rebuild_from_their_revision_2_graphs():
    rebuilt = rebuild(BUNDLED_REPOSITORY / "g2p-transformer" / "1")
    assert rebuilt.raw["format_revision"] == 2
    assert rebuilt.payload["meta"]["dev_metrics"] == rebuilt.raw["metrics"]["dev"]


@pytest.mark.parametrize("name", ["dates-luong", "g2p-bahdanau", "caption-fashion"])
def test_bundled_rnn_families_rebuild_by_tracing_and_reproduce_their_graphs(name, tmp_path):
    folder = bundled_entry(name)
    path = checkpoint_from_entry(folder, tmp_path / "start.pt")  # checks the rebuilt model against the graphs
    model, src_vocab, _, payload = load_checkpoint(path)
    assert payload["meta"]["rebuilt_from"]["max_abs_diff"] <= 1e-4
    assert list(src_vocab.tokens) == Manifest.load(folder).raw["source"]["vocab"]
    rebuilt = rebuild(folder)
    for (key, want), got in zip(rebuilt.model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)


def test_tracing_names_each_unnamed_element_by_the_parameter_element_it_copies():
    arch = architecture("luong-gru")
    model = arch.model_cls(arch.config_cls(src_vocab_size=12, tgt_vocab_size=7, embed_size=8, hidden_size=6))
    example = SourceBatch.from_ids([[3, 4, 5], [6, 7]])
    traced = trace_unnamed(arch.for_config(model.config), model, example)
    params = dict(model.named_parameters())
    starts = np.cumsum([0] + [p.numel() for p in params.values()])
    gru = [index for index in traced.values() if index.ndim == 3]  # ONNX GRU weights (1, 3H, in)
    covered = {}
    for index in gru:
        owners = {list(params)[i] for i in np.searchsorted(starts, index.ravel(), side="right") - 1}
        assert len(owners) == 1  # gates reordered, but one parameter's elements
        (owner,) = owners
        covered[owner] = np.unique(index).size
    assert covered == {  # every element of each encoder GRU's input and hidden weights, once
        f"enc_{d}.weight_{w}_l0": params[f"enc_{d}.weight_{w}_l0"].numel()
        for d in ("fwd", "bwd")
        for w in ("ih", "hh")
    }
    every = np.concatenate([index.ravel() for index in traced.values()])
    assert len(np.unique(every)) == every.size  # no parameter element is copied twice
