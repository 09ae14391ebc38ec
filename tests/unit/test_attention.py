"""The attention math: normalisation, masking and hand-computed scores."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.models.attention import (
    AdditiveScore,
    DotScore,
    GeneralScore,
    make_score,
    masked_softmax,
    scaled_dot_product_attention,
)


def _softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def _random_mask(B, S, seed):
    """A (B, S) mask with at least one real position per row, padding at the end."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    return torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)


MODULES = {
    "dot": lambda D: DotScore(),
    "general": lambda D: GeneralScore(D, D),
    "concat": lambda D: AdditiveScore(D, D, 5),
}


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(MODULES)),
    B=st.integers(1, 4),
    S=st.integers(1, 9),
    seed=st.integers(0, 10_000),
)
def test_weights_sum_to_one_and_padding_gets_zero(kind, B, S, seed):
    torch.manual_seed(seed)
    D = 6
    module = MODULES[kind](D)
    query, keys = torch.randn(B, D) * 3, torch.randn(B, S, D) * 3
    mask = _random_mask(B, S, seed)
    context, weights = module(query, keys, keys, mask)
    assert weights.shape == (B, S) and context.shape == (B, D)
    torch.testing.assert_close(weights.sum(1), torch.ones(B))
    assert torch.all(weights[~mask] == 0)
    # The context only mixes real positions: changing padded values changes nothing.
    noisy = keys.masked_fill(~mask.unsqueeze(2), 1e3)
    context2, _ = module(query, keys, noisy, mask)
    torch.testing.assert_close(context, context2)


def test_dot_scores_match_hand_computation():
    q = torch.tensor([[1.0, 2.0]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # scores 1, 2, 3
    v = torch.tensor([[[1.0], [10.0], [100.0]]])
    context, weights = DotScore()(q, k, v)
    expected = _softmax([1.0, 2.0, 3.0])
    torch.testing.assert_close(weights[0], torch.tensor(expected))
    torch.testing.assert_close(
        context[0, 0], torch.tensor(expected[0] + 10 * expected[1] + 100 * expected[2])
    )


def test_general_scores_match_hand_computation():
    module = GeneralScore(2, 3)
    with torch.no_grad():
        module.W.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))  # W: (Dq, Dk)
    q = torch.tensor([[0.5, 1.0]])
    k = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]]])
    # q · W k: k1 -> W k1 = (3, 0) -> 1.5 ; k2 -> W k2 = (0, -2) -> -2
    _, weights = module(q, k, k)
    torch.testing.assert_close(weights[0], torch.tensor(_softmax([1.5, -2.0])))


def test_additive_scores_match_hand_computation():
    module = AdditiveScore(query_size=1, key_size=1, attention_size=2)
    with torch.no_grad():
        module.W_q.weight.copy_(torch.tensor([[1.0], [0.0]]))
        module.W_k.weight.copy_(torch.tensor([[0.0], [1.0]]))
        module.W_k.bias.zero_()
        module.v.weight.copy_(torch.tensor([[1.0, 2.0]]))
    q = torch.tensor([[0.3]])
    k = torch.tensor([[[0.5], [-1.0]]])
    scores = [math.tanh(0.3) + 2 * math.tanh(0.5), math.tanh(0.3) + 2 * math.tanh(-1.0)]
    _, weights = module(q, k, k)
    torch.testing.assert_close(weights[0], torch.tensor(_softmax(scores)))


def test_scaled_dot_product_divides_by_sqrt_dk_and_respects_causal_mask():
    q = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])  # (1, T=2, d=4)
    k = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    causal = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    _, weights = scaled_dot_product_attention(q, k, k, causal)
    # row 0 may only see position 0; row 1 sees scores (0, 2) / sqrt(4) = (0, 1)
    torch.testing.assert_close(weights[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(weights[0, 1], torch.tensor(_softmax([0.0, 1.0])))


def test_masked_softmax_without_mask_is_softmax():
    x = torch.randn(3, 5)
    torch.testing.assert_close(masked_softmax(x, None), torch.softmax(x, -1))


def test_make_score_validates():
    with pytest.raises(ValueError, match="equal query and key sizes"):
        make_score("dot", 4, 8, 4)
    with pytest.raises(ValueError, match="unknown attention score"):
        make_score("bilinear", 4, 4, 4)
    assert isinstance(make_score("concat", 4, 8, 3), AdditiveScore)
