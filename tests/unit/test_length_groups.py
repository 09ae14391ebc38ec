"""Length grouping of encoder calls: a policy on plain arrays, checked against brute force."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from attnserve.core.sources import SourceBatch, length_groups


def _cost(groups, lengths, call_tokens):
    return sum(call_tokens + len(g) * max(lengths[i] for i in g) for g in groups)


def _best_contiguous_cost(lengths, call_tokens):
    """Least cost over every way to cut the sorted rows into calls (2^(n-1) ways)."""
    ordered = sorted(lengths)
    n, best = len(ordered), float("inf")
    for cuts in itertools.product([False, True], repeat=n - 1):
        groups, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(ordered[start:i])
                start = i
        groups.append(ordered[start:])
        best = min(best, sum(call_tokens + len(g) * max(g) for g in groups))
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=9), st.integers(0, 40))
def test_groups_cover_every_row_once_at_the_least_cost(lengths, call_tokens):
    groups = length_groups(np.array(lengths), call_tokens)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert _cost(groups, lengths, call_tokens) == _best_contiguous_cost(lengths, call_tokens)
    tops = [max(lengths[i] for i in g) for g in groups]
    assert tops == sorted(tops)  # shortest rows first


def test_a_costly_call_keeps_one_group_and_a_free_call_splits_by_length():
    lengths = np.array([3, 30, 3, 30, 4])
    assert len(length_groups(lengths, 1000)) == 1
    groups = length_groups(lengths, 0)
    assert [sorted(lengths[g].tolist()) for g in groups] == [[3, 3], [4], [30, 30]]


def test_take_cuts_text_to_its_longest_row():
    batch = SourceBatch.from_ids([[5, 6, 7, 8], [9], [4, 4]])
    part = batch.take(np.array([1, 2]))
    assert part.inputs["src_ids"].tolist() == [[9, 0], [4, 4]]
    assert part.inputs["src_mask"].tolist() == [[True, False], [True, True]]
    assert part.lengths.tolist() == [1, 2]
    images = SourceBatch.from_images(np.arange(24, dtype=np.float32).reshape(3, 1, 2, 4))
    assert np.array_equal(images.take(np.array([2])).inputs["images"], images.inputs["images"][[2]])
