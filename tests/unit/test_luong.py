"""The Luong model: every score function trains, masks padding and is batch-invariant."""

import pytest
import torch

from attnserve.models.luong import LuongConfig, LuongSeq2Seq


def _model(score: str) -> LuongSeq2Seq:
    torch.manual_seed(0)
    return LuongSeq2Seq(LuongConfig(src_vocab_size=20, tgt_vocab_size=15, score=score, hidden_size=16,
                                    embed_size=8, dropout=0.0))  # fmt: skip


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_padding_never_changes_a_sequence(score):
    model = _model(score).eval()
    long_ids = torch.tensor([[3, 4, 5, 6, 7]])
    short_ids = torch.tensor([[8, 9, 10, 0, 0]])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    tgt = torch.tensor([[1, 4, 5], [1, 6, 7]])
    with torch.no_grad():
        both = model(torch.cat([long_ids, short_ids]), mask, tgt)
        alone = model(short_ids[:, :3], mask[1:, :3], tgt[1:])
        memory, state, feed = model.encode(torch.cat([long_ids, short_ids]), mask)
        _, _, _, weights = model.decode_step(tgt[:, 0], state, feed, memory, mask)
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    assert torch.all(weights[1, 3:] == 0)


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_every_parameter_learns(score):
    model = _model(score)
    src = torch.randint(3, 20, (4, 6))
    tgt = torch.randint(3, 15, (4, 5))
    logits = model(src, torch.ones(4, 6, dtype=torch.bool), tgt)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 15), tgt.roll(-1, 1).reshape(-1)).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not unused


def test_unknown_score_is_rejected():
    with pytest.raises(ValueError, match="unknown score"):
        LuongConfig(src_vocab_size=5, tgt_vocab_size=5, score="bilinear")
