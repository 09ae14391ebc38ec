"""The numpy decode loop over the real ONNX graphs: batching must not change any result."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.decoding import DecodeJob, RunningBatch, decode, greedy_decode, length_normalised
from attnserve.core.onnx_model import OnnxSeq2Seq, ProviderError, RuntimeConfig, choose_providers
from attnserve.core.sources import SourceBatch, pad_batch
from attnserve.models.g2p_data import load_split


@pytest.fixture(scope="module")
def model(bundled_manifest):
    return OnnxSeq2Seq(bundled_manifest)


@pytest.fixture(scope="module")
def sources(bundled_manifest):
    words = [e.word for e in load_split("test")[:40:3]]
    return [bundled_manifest.source_vocab.encode(list(w)) for w in words]


def _decode(model, manifest, sources, limits):
    vocab = manifest.target_vocab
    return greedy_decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits)


def test_batched_equals_one_by_one(model, bundled_manifest, sources):
    batched = _decode(model, bundled_manifest, sources, [32] * len(sources))
    for src, hyp in zip(sources, batched, strict=True):
        (alone,) = _decode(model, bundled_manifest, [src], [32])
        assert hyp.token_ids == alone.token_ids
        np.testing.assert_allclose(hyp.attention, alone.attention, atol=1e-5)


def test_attention_rows_are_distributions_over_the_real_source(model, bundled_manifest, sources):
    for src, hyp in zip(sources, _decode(model, bundled_manifest, sources, [32] * len(sources)), strict=True):
        assert hyp.finished and len(hyp.token_ids) > 0
        assert hyp.attention.shape == (len(hyp.token_ids), len(src))
        np.testing.assert_allclose(hyp.attention.sum(axis=1), 1.0, atol=1e-5)


def test_per_row_limits_are_respected(model, bundled_manifest, sources):
    limits = [i % 4 for i in range(len(sources))]  # 0..3 tokens
    full = _decode(model, bundled_manifest, sources, [32] * len(sources))
    for limit, hyp, ref in zip(limits, _decode(model, bundled_manifest, sources, limits), full, strict=True):
        assert hyp.token_ids == ref.token_ids[:limit]
        assert hyp.attention.shape[0] == len(hyp.token_ids)


def test_pad_batch():
    ids, mask = pad_batch([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_provider_selection_is_explicit():
    assert choose_providers(RuntimeConfig(("CUDAExecutionProvider", "CPUExecutionProvider"))) in (
        ["CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    with pytest.raises(ProviderError, match="required"):
        choose_providers(
            RuntimeConfig(("NoSuchExecutionProvider", "CPUExecutionProvider"), require_first=True)
        )
    with pytest.raises(ProviderError, match="none of"):
        choose_providers(RuntimeConfig(("NoSuchExecutionProvider",)))


def _sequence_logprob(model, src, token_ids, bos_id, eos_id) -> float:
    """log P(token_ids + </s> | src) under the model, by teacher forcing through step()."""
    state = model.encode(SourceBatch.from_ids([src]).inputs)
    prev, total = np.array([bos_id]), 0.0
    for token in [*token_ids, eos_id]:
        logits, _, state = model.step(prev, state)
        logp = logits[0].astype(np.float64) - np.log(np.exp(logits[0].astype(np.float64)).sum())
        total += logp[token]
        prev = np.array([token])
    return total


def test_beam_of_one_is_greedy_and_beams_are_batch_invariant(model, bundled_manifest, sources):
    vocab = bundled_manifest.target_vocab
    limits = [32] * len(sources)
    greedy = greedy_decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits)
    assert [
        h.token_ids
        for h in decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits, 1)
    ] == [h.token_ids for h in greedy]
    beams = decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits, 4)
    for src, hyp in zip(sources, beams, strict=True):
        (alone,) = decode(model, SourceBatch.from_ids([src]), vocab.bos_id, vocab.eos_id, [32], 4)
        assert hyp.token_ids == alone.token_ids
        assert hyp.attention.shape == (len(hyp.token_ids), len(src))
        np.testing.assert_allclose(hyp.attention.sum(axis=1), 1.0, atol=1e-5)


def test_beam_search_finds_likelier_outputs_than_greedy(model, bundled_manifest):
    vocab = bundled_manifest.target_vocab
    words = [e.word for e in load_split("test")[::40]]  # ~160 words
    sources = [bundled_manifest.source_vocab.encode(list(w)) for w in words]
    limits = [32] * len(sources)
    greedy = greedy_decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits)
    beams = decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits, 8)
    gains = [
        _sequence_logprob(model, s, b.token_ids, vocab.bos_id, vocab.eos_id)
        - _sequence_logprob(model, s, g.token_ids, vocab.bos_id, vocab.eos_id)
        for s, g, b in zip(sources, greedy, beams, strict=True)
    ]
    assert min(gains) > -1e-6 or np.mean(gains) > 0  # beam search is not exact, but never worse on average
    assert sum(g > 1e-6 for g in gains) >= 1, "beam search changed no output"


def test_beam_respects_per_row_limits(model, bundled_manifest, sources):
    vocab = bundled_manifest.target_vocab
    limits = [i % 3 for i in range(len(sources))]
    for limit, hyp in zip(
        limits,
        decode(model, SourceBatch.from_ids(sources), vocab.bos_id, vocab.eos_id, limits, 3),
        strict=True,
    ):
        assert len(hyp.token_ids) <= limit
        assert hyp.attention.shape[0] == len(hyp.token_ids)


def test_length_normalisation():
    assert length_normalised(-6.0, 1, 0.0) == -6.0
    assert length_normalised(-6.0, 7, 1.0) == pytest.approx(-3.0)  # ((5 + 7) / 6) ** 1 = 2


@pytest.fixture(scope="module")
def transformer():
    from attnserve.core.manifest import Manifest
    from tests.conftest import BUNDLED_REPOSITORY

    manifest = Manifest.load(BUNDLED_REPOSITORY / "g2p-transformer" / "1")
    return OnnxSeq2Seq(manifest), manifest


JOINS = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 4), st.sampled_from([1, 1, 3])), min_size=1, max_size=8
)  # (source index, steps to run before it joins, beam size) per request


def _joined_equals_alone(model, vocab, sources, joins, extras=()):
    """Requests joining a running batch at the given steps decode as they do alone."""
    batch = RunningBatch(model, vocab.bos_id, vocab.eos_id, 32)
    got, jobs = {}, []
    for i, (pick, wait, beam) in enumerate(joins):
        for _ in range(wait):
            got.update({job.tag: hyp for job, hyp in batch.step()})
        job = DecodeJob(32, beam, extras=extras, tag=i)
        jobs.append((job, sources[pick % len(sources)]))
        batch.add([job], SourceBatch.from_ids([jobs[-1][1]]))
    while batch.rows:
        got.update({job.tag: hyp for job, hyp in batch.step()})
    for job, src in jobs:
        (alone,) = decode(model, SourceBatch.from_ids([src]), vocab.bos_id, vocab.eos_id, [32], job.beam_size,
                          extras=extras)  # fmt: skip
        assert got[job.tag].token_ids == alone.token_ids
        np.testing.assert_allclose(got[job.tag].attention, alone.attention, atol=1e-5)
        for name in extras:
            np.testing.assert_allclose(got[job.tag].extras[name], alone.extras[name], atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(joins=JOINS)
def test_requests_joining_at_any_step_decode_as_alone(model, bundled_manifest, sources, joins):
    _joined_equals_alone(model, bundled_manifest.target_vocab, sources, joins)


@settings(max_examples=10, deadline=None)
@given(joins=JOINS, extra=st.sampled_from(["cross_heads", "decoder_self", "encoder_self"]))
def test_transformer_rows_at_different_positions_decode_as_alone(transformer, joins, extra):
    model, manifest = transformer
    sources = [manifest.source_vocab.encode(list(e.word)) for e in load_split("test")[:40:3]]
    _joined_equals_alone(model, manifest.target_vocab, sources, joins, (extra,))
