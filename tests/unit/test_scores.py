"""Scores: the decode loop's log-probabilities equal the torch model's log-softmax on the tokens it
chose, for every family, greedy and beam; n-best lists are sorted and distinct; batched equals alone."""

from pathlib import Path

import numpy as np
import pytest
import torch

from attnserve.core.decoding import decode, length_normalised
from attnserve.core.manifest import Manifest
from attnserve.core.onnx_model import OnnxSeq2Seq
from attnserve.core.sources import SourceBatch
from attnserve.export.from_entry import rebuild
from attnserve.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_FAMILIES = {  # task, architecture, model config: small enough to train for a test
    "luong-gru": ("dates", dict(score="general", embed_size=16, hidden_size=32)),
    "captioner-lstm": ("caption", dict(channels=[8, 16], stem_channels=8, context_layers=1, embed_size=16,
                                       decoder_size=32, attention_size=16, alpha_c=0.005, gate=False)),
}  # fmt: skip


@pytest.fixture(scope="module", params=["bahdanau-gru", "luong-gru", "captioner-lstm", "transformer"])
def family(request, tmp_path_factory):
    """(torch model in eval mode, the ONNX model of the same weights, its manifest) per family."""
    if request.param == "bahdanau-gru":
        checkpoint, entry = request.getfixturevalue("tiny_checkpoint"), request.getfixturevalue("tiny_entry")
        model = load_checkpoint(checkpoint)[0]
    elif request.param == "transformer":
        entry = ROOT / "model_repository" / "g2p-transformer" / "1"
        model = rebuild(entry).model
    else:
        from attnserve.export.pipeline import ExportConfig, export_model
        from attnserve.models.tasks import task
        from attnserve.models.train import TrainConfig, train

        out = tmp_path_factory.mktemp(request.param)
        task_name, config = TINY_FAMILIES[request.param]
        cfg = TrainConfig(epochs=1, batch_size=64, max_train_examples=300, max_eval_examples=40, threads=1)
        checkpoint = train(out, task(task_name), request.param, config, cfg)
        export = ExportConfig(checkpoint, out / "repo", "tiny", eval_limit=20, parity_examples=20)
        entry = export_model(export)
        model = load_checkpoint(checkpoint)[0]
    manifest = Manifest.load(entry)
    return model.eval(), OnnxSeq2Seq(manifest), manifest


def _sources(manifest: Manifest, rows: int) -> SourceBatch:
    """A few sources the model accepts: images of noise, or its own source tokens."""
    rng = np.random.default_rng(7)
    if manifest.image is not None:
        shape = (rows, manifest.image.channels, manifest.image.height, manifest.image.width)
        return SourceBatch.from_images(rng.random(shape, dtype=np.float32))
    vocab = manifest.source_vocab
    ids = [i for i, t in enumerate(vocab.tokens) if not t.startswith("<")]
    return SourceBatch.from_ids([list(rng.choice(ids, size=3 + 2 * r)) for r in range(rows)])


@torch.no_grad()
def _torch_logprobs(model, source: SourceBatch, row: int, tokens: list[int], bos: int, eos: int, ended: bool):
    """Log-softmax of the torch model's teacher-forced logits at each chosen token (and </s>)."""
    targets = tokens + [eos] * ended
    tgt_in = torch.tensor([[bos, *targets[:-1]]])
    if "images" in source.inputs:
        logits, _ = model(torch.from_numpy(source.inputs["images"][row : row + 1]), tgt_in)  # and alphas
    else:
        length = int(source.lengths[row])
        src = torch.from_numpy(source.inputs["src_ids"][row : row + 1, :length])
        logits = model(src, src != 0, tgt_in)
    logp = torch.log_softmax(logits[0].double(), dim=-1)  # (T, V)
    return logp[torch.arange(len(targets)), torch.tensor(targets)].numpy()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_scores_equal_the_torch_models_log_softmax(family, beam_size):
    model, onnx_model, manifest = family
    vocab = manifest.target_vocab
    source = _sources(manifest, 4)
    hyps = decode(onnx_model, source, vocab.bos_id, vocab.eos_id, [12] * source.size, beam_size, scores=True)
    for row, hyp in enumerate(hyps):
        want = _torch_logprobs(model, source, row, hyp.token_ids, vocab.bos_id, vocab.eos_id, hyp.finished)
        np.testing.assert_allclose(hyp.token_logprobs, want[: len(hyp.token_ids)], atol=2e-4)
        assert hyp.score == pytest.approx(want.sum(), abs=1e-3)
        assert hyp.score <= 0


def test_n_best_lists_are_sorted_distinct_and_start_with_the_answer(family):
    _, onnx_model, manifest = family
    vocab = manifest.target_vocab
    source = _sources(manifest, 3)
    for penalty in (0.0, 1.0):
        hyps = decode(onnx_model, source, vocab.bos_id, vocab.eos_id, [10] * source.size, 4, penalty,
                      num_hypotheses=4)  # fmt: skip
        for hyp in hyps:
            listed = [hyp, *hyp.alternatives]
            assert 1 <= len(listed) <= 4
            ranks = [length_normalised(h.score, len(h.token_ids), penalty) for h in listed]
            assert ranks == sorted(ranks, reverse=True)
            assert len({tuple(h.token_ids) for h in listed}) == len(listed)
            assert hyp.alternatives == () or hyp.alternatives[0].extras == {}


def test_scores_batched_equal_alone(family):
    _, onnx_model, manifest = family
    vocab = manifest.target_vocab
    source = _sources(manifest, 4)
    together = decode(onnx_model, source, vocab.bos_id, vocab.eos_id, [12] * source.size, scores=True)
    for row, hyp in enumerate(together):
        alone = SourceBatch({k: v[row : row + 1] for k, v in source.inputs.items()},
                            None if source.lengths is None else source.lengths[row : row + 1])  # fmt: skip
        (single,) = decode(onnx_model, alone.take([0]), vocab.bos_id, vocab.eos_id, [12], scores=True)
        assert single.token_ids == hyp.token_ids
        np.testing.assert_allclose(single.token_logprobs, hyp.token_logprobs, atol=1e-5)


def test_unscored_greedy_rows_carry_no_scores(family):
    _, onnx_model, manifest = family
    vocab = manifest.target_vocab
    for hyp in decode(onnx_model, _sources(manifest, 2), vocab.bos_id, vocab.eos_id, [6, 6]):
        assert hyp.token_logprobs is None and hyp.score is None and hyp.alternatives == ()
