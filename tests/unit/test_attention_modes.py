"""Per-layer/per-head and self-attention of a Transformer, through the serving runtime."""

import numpy as np
import pytest

from attnserve.core.errors import RequestError
from attnserve.core.head_selection import HeadSelection, Reduction
from attnserve.core.manifest import Manifest
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import AttentionMode
from tests.helpers import answers

WORDS = ["attention", "heads", "x", "transformers"]


@pytest.fixture(scope="module")
def runner(tiny_transformer_entry):
    return ModelRunner(Manifest.load(tiny_transformer_entry))


def _translate(runner, mode, beam_size=1):
    requests = [runner.codec.prepare(w, mode, beam_size=beam_size) for w in WORDS]
    return answers(runner, requests)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_per_head_modes_have_one_labelled_distribution_per_row(runner, beam_size):
    config = runner.manifest.raw["model_config"]
    for mode in (AttentionMode.CROSS_HEADS, AttentionMode.ENCODER_SELF, AttentionMode.DECODER_SELF):
        for word, result in zip(WORDS, _translate(runner, mode, beam_size), strict=True):
            layers = config["encoder_layers" if mode is AttentionMode.ENCODER_SELF else "decoder_layers"]
            assert result.attention is None
            assert [(h.layer, h.head) for h in result.heads] == [
                (layer, head) for layer in range(layers) for head in range(config["heads"])
            ]
            for h in result.heads:
                assert h.weights.shape == (len(h.row_labels), len(h.col_labels))
                np.testing.assert_allclose(h.weights.sum(axis=1), 1.0, atol=1e-4)
                if mode is AttentionMode.ENCODER_SELF:
                    assert h.row_labels == h.col_labels == tuple(word)
                else:
                    assert h.row_labels == result.output_tokens
                if mode is AttentionMode.DECODER_SELF:  # causal: step t sees <s> and the t tokens before
                    assert h.col_labels == ("<s>", *result.output_tokens)[: len(h.col_labels)]
                    assert np.allclose(np.triu(h.weights, k=1), 0.0)
                if mode is AttentionMode.CROSS_HEADS:
                    assert h.col_labels == tuple(word)


def test_head_average_of_the_last_layer_is_the_cross_attention(runner):
    cross = _translate(runner, AttentionMode.CROSS)
    heads = _translate(runner, AttentionMode.CROSS_HEADS)
    last = runner.manifest.raw["model_config"]["decoder_layers"] - 1
    for c, h in zip(cross, heads, strict=True):
        assert c.output_tokens == h.output_tokens  # asking for more attention never changes the output
        mean = np.mean([m.weights for m in h.heads if m.layer == last], axis=0)
        np.testing.assert_allclose(mean, c.attention, atol=1e-5)


def test_mixed_modes_in_one_batch(runner):
    modes = [AttentionMode.NONE, AttentionMode.CROSS, AttentionMode.DECODER_SELF, AttentionMode.ENCODER_SELF]
    results = answers(runner, [runner.codec.prepare("mixed", m) for m in modes])
    assert [r.attention is not None for r in results] == [False, True, False, False]
    assert [bool(r.heads) for r in results] == [False, False, True, True]
    assert len({r.output_tokens for r in results}) == 1


def test_rnn_models_refuse_per_head_modes(bundled_manifest):
    codec = ModelRunner(bundled_manifest).codec
    with pytest.raises(RequestError, match="does not return cross_heads attention"):
        codec.prepare("cat", AttentionMode.CROSS_HEADS)


@pytest.mark.parametrize(
    "mode", [AttentionMode.CROSS_HEADS, AttentionMode.ENCODER_SELF, AttentionMode.DECODER_SELF]
)
def test_selected_layers_and_heads_are_those_of_the_whole_answer_reduced_as_asked(runner, mode):
    full = {(h.layer, h.head): h.weights for h in _translate(runner, mode)[0].heads}
    config = runner.manifest.raw["model_config"]
    last = (config["encoder_layers"] if mode is AttentionMode.ENCODER_SELF else config["decoder_layers"]) - 1
    for reduction, reduce in ((Reduction.NONE, None), (Reduction.MEAN, np.mean), (Reduction.MAX, np.max)):
        selection = HeadSelection(layers=(last,), heads=(1, 0), reduction=reduction)
        (result,) = answers(runner, [runner.codec.prepare(WORDS[0], mode, selection=selection)])
        if reduce is None:
            assert [(h.layer, h.head) for h in result.heads] == [(last, 1), (last, 0)]
            for h in result.heads:
                np.testing.assert_allclose(h.weights, full[h.layer, h.head], atol=1e-5)
        else:
            (h,) = result.heads
            assert (h.layer, h.head, h.reduction) == (last, 0, reduction)
            want = reduce(np.stack([full[last, 1], full[last, 0]]), axis=0)
            np.testing.assert_allclose(h.weights, want, atol=1e-5)


@pytest.mark.parametrize(
    "mode, selection, message",
    [
        (AttentionMode.CROSS_HEADS, HeadSelection(layers=(7,)), "no layer 7"),
        (AttentionMode.CROSS_HEADS, HeadSelection(heads=(0, 0)), "listed twice"),
        (AttentionMode.CROSS, HeadSelection(reduction=Reduction.MEAN), "per-head attention mode"),
    ],
)
def test_a_selection_the_model_or_mode_cannot_take_is_invalid(runner, mode, selection, message):
    with pytest.raises(RequestError, match=message):
        runner.codec.prepare("heads", mode, selection=selection)


def test_a_per_head_request_that_could_exceed_the_size_limit_is_refused_before_decoding(monkeypatch, runner):
    from attnserve.core import codec

    config = runner.manifest.raw["model_config"]
    matrices = config["decoder_layers"] * config["heads"]
    limit = runner.manifest.max_output_tokens
    monkeypatch.setattr(codec, "MAX_ATTENTION_WEIGHTS", matrices * limit * limit - 1)
    with pytest.raises(RequestError, match="over the limit") as info:
        runner.codec.prepare("heads", AttentionMode.DECODER_SELF)
    assert "reduce them" in info.value.message
    runner.codec.prepare(
        "heads", AttentionMode.DECODER_SELF, selection=HeadSelection(reduction=Reduction.MEAN)
    )
    runner.codec.prepare("heads", AttentionMode.DECODER_SELF, max_output_tokens=limit - 1)


def test_transformer_alignments_follow_the_middle_decoder_layer(bundled_repository_transformer):
    from attnserve.core.alignment import AlignmentMode

    runner = bundled_repository_transformer
    layers = runner.manifest.raw["model_config"]["decoder_layers"]
    for word in ("alignment", "phoneme", "colonel"):
        request = runner.codec.prepare(word, AttentionMode.CROSS_HEADS, alignment=AlignmentMode.HARD)
        (result,) = answers(runner, [request])
        middle = np.mean([h.weights for h in result.heads if h.layer == layers // 2], axis=0)  # (T, S)
        pairs = [tuple(map(int, p.split("-"))) for p in result.alignment.split()]
        assert pairs == [(int(s), t) for t, s in enumerate(middle.argmax(axis=1))]
        plain = runner.codec.prepare(word, AttentionMode.NONE, alignment=AlignmentMode.HARD)
        assert answers(runner, [plain])[0].alignment == result.alignment  # whatever the attention mode


@pytest.fixture(scope="module")
def bundled_repository_transformer():
    from tests.conftest import BUNDLED_REPOSITORY

    return ModelRunner(Manifest.load(BUNDLED_REPOSITORY / "g2p-transformer" / "1"))
