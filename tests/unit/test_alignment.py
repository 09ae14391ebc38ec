"""Alignments from attention: in bounds, HARD the argmax, SOFT the weights over a threshold, words."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from attnserve.core.alignment import AlignmentMode, links, pharaoh, word_indexes, word_links

_matrices = (
    st.tuples(st.integers(1, 9), st.integers(1, 9))
    .flatmap(lambda shape: arrays(np.float32, shape, elements=st.floats(0.0625, 1, width=32)))
    .map(lambda a: a / a.sum(axis=1, keepdims=True))
)


@settings(max_examples=200, deadline=None)
@given(_matrices, st.floats(0.05, 1.0))
def test_links_lie_within_bounds_and_follow_the_weights(attention, threshold):
    rows, cols = attention.shape
    hard = links(attention, AlignmentMode.HARD)
    assert [t for _, t in hard] == list(range(rows))  # one link per output token
    assert all(attention[t, s] == attention[t].max() for s, t in hard)
    soft = links(attention, AlignmentMode.SOFT, threshold)
    assert set(soft) == {(s, t) for t in range(rows) for s in range(cols) if attention[t, s] >= threshold}
    assert soft == sorted(soft, key=lambda link: (link[1], link[0]))
    assert links(attention, AlignmentMode.NONE) == []


def test_pharaoh_and_words():
    assert pharaoh([(0, 0), (2, 1)]) == "0-0 2-1"
    assert pharaoh([]) == ""
    assert word_indexes(["▁new", "▁back", "up", "▁tool"]) == [0, 1, 1, 2]
    assert word_indexes(["ba", "▁ck"]) == [0, 1]  # a text need not start with a word mark
    source, output = ["▁back", "up", "▁tool"], ["▁outil", "▁de", "▁sauve", "garde"]
    token_links = [(2, 0), (0, 1), (0, 2), (1, 3)]
    assert word_links(token_links, source, output) == [(1, 0), (0, 1), (0, 2)]


@settings(max_examples=100, deadline=None)
@given(_matrices, st.data())
def test_word_links_index_words_that_exist(attention, data):
    rows, cols = attention.shape
    src = ["▁s" if b else "s" for b in data.draw(st.lists(st.booleans(), min_size=cols, max_size=cols))]
    out = ["▁t" if b else "t" for b in data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows))]
    merged = word_links(links(attention, AlignmentMode.HARD), src, out)
    assert all(0 <= s <= max(word_indexes(src)) and 0 <= t <= max(word_indexes(out)) for s, t in merged)
    assert {t for _, t in merged} == set(word_indexes(out))  # every output word keeps a link
