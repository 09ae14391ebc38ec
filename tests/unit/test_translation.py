"""Request validation (fuzzed) and per-request isolation of failures inside a batch."""

import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.codec import SourceCodec
from attnserve.core.errors import ErrorCode, RequestError
from attnserve.core.model_runner import ModelRunner
from attnserve.core.requests import Answer, AttentionMode, PreparedRequest
from tests.helpers import answers


@pytest.fixture(scope="module")
def codec(bundled_manifest):
    return SourceCodec(bundled_manifest)


@pytest.fixture(scope="module")
def runner(bundled_manifest):
    return ModelRunner(bundled_manifest)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text is empty"),
        ("   \n", "text is empty"),
        ("a" * 33, "at most 32"),
        ("héllo", "cannot read 'é'"),
        ("two words", "cannot read ' '"),
        ("x\x00y", "cannot read '\\x00'"),
    ],
)
def test_bad_text_is_invalid_argument_with_a_reason(codec, text, message):
    with pytest.raises(RequestError) as info:
        codec.prepare(text, AttentionMode.NONE)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert message in info.value.message


def test_text_is_normalised_and_limits_are_capped(codec, bundled_manifest):
    prepared = codec.prepare("  Attention\n", AttentionMode.CROSS, max_output_tokens=10_000)
    assert prepared.source_tokens == tuple("attention")
    assert prepared.max_output_tokens == bundled_manifest.max_output_tokens
    assert codec.prepare("cat", AttentionMode.NONE, max_output_tokens=2).max_output_tokens == 2
    with pytest.raises(RequestError, match="negative"):
        codec.prepare("cat", AttentionMode.NONE, max_output_tokens=-1)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(string.ascii_letters), max_size=40))
def test_any_text_is_either_prepared_or_rejected_cleanly(codec, text):
    try:
        prepared = codec.prepare(text, AttentionMode.CROSS)
    except RequestError as e:
        assert e.code is ErrorCode.INVALID_ARGUMENT and e.message
        return
    assert 0 < len(prepared.source_ids) <= 32
    assert all(3 <= i < len(codec.manifest.source_vocab) for i in prepared.source_ids)


def test_answers_carry_attention_only_when_asked(runner, codec):
    with_attn, without = answers(
        runner,
        [codec.prepare("attention", AttentionMode.CROSS), codec.prepare("attention", AttentionMode.NONE)],
    )
    assert with_attn.output_tokens == without.output_tokens and with_attn.batch_size == 2
    assert with_attn.attention.shape == (len(with_attn.output_tokens), len("attention"))
    assert without.attention is None
    assert with_attn.text == " ".join(with_attn.output_tokens)


def test_one_failing_request_does_not_fail_its_batch(runner, codec):
    good = codec.prepare("serving", AttentionMode.NONE)
    # A request that bypassed validation: a source id outside the embedding table makes ORT fail.
    bad = PreparedRequest(("?",), (10_000,), 8, AttentionMode.NONE)
    results = answers(runner, [good, bad, good])
    assert isinstance(results[0], Answer) and isinstance(results[2], Answer)
    assert results[0].output_tokens == answers(runner, [good])[0].output_tokens
    assert isinstance(results[1], RequestError) and results[1].code is ErrorCode.INTERNAL
    assert "10000" not in results[1].message and "onnx" not in results[1].message.lower()


@pytest.mark.parametrize(
    ("beam_size", "length_penalty", "message"),
    [
        (17, 0.0, "beam_size must be between 1 and 16"),
        (4, -0.1, "length_penalty"),
        (4, float("nan"), "length_penalty"),
        (4, 2.5, "length_penalty"),
    ],
)
def test_out_of_range_beam_options_are_invalid(codec, beam_size, length_penalty, message):
    with pytest.raises(RequestError, match=message) as info:
        codec.prepare("cat", AttentionMode.NONE, beam_size=beam_size, length_penalty=length_penalty)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_a_batch_mixing_beam_settings_equals_each_setting_alone(runner, codec):
    words = ["pneumonia", "colonel", "wednesday", "yacht"]
    settings_ = [(0, 0.0), (4, 0.0), (4, 1.0), (1, 0.0)]
    mixed = [
        codec.prepare(w, AttentionMode.CROSS, beam_size=b, length_penalty=lp)
        for w in words
        for b, lp in settings_
    ]
    together = answers(runner, mixed)
    for request, result in zip(mixed, together, strict=True):
        (alone,) = answers(runner, [request])
        assert result.output_tokens == alone.output_tokens
        np.testing.assert_allclose(result.attention, alone.attention, atol=1e-5)
