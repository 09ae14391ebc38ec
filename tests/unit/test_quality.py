"""Answer-quality signals: bounds and the extremes they must tell apart."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from attnserve.core.quality import answer_quality


@settings(max_examples=200, deadline=None)
@given(
    st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
        lambda shape: arrays(np.float32, shape, elements=st.floats(0.0625, 1, width=32))
    )
)
def test_signals_lie_in_their_ranges(weights):
    attention = weights / weights.sum(axis=1, keepdims=True)
    q = answer_quality(attention, np.log(attention.max(axis=1)))
    assert 0 <= q.entropy <= 1 + 1e-6 and 0 <= q.coverage <= 1 and q.mean_logprob <= 0


def test_sharp_attention_that_reads_every_token_and_spread_attention_that_reads_none():
    diagonal = np.eye(5, dtype=np.float32)
    sharp = answer_quality(diagonal, None)
    assert sharp.entropy < 1e-6 and sharp.coverage == 1.0 and sharp.mean_logprob is None
    uniform = answer_quality(np.full((1, 5), 0.2, np.float32), np.array([-0.5]))
    assert uniform.entropy > 0.999 and uniform.coverage == 0.0 and uniform.mean_logprob == -0.5
    assert answer_quality(np.zeros((0, 4), np.float32), None) is None
