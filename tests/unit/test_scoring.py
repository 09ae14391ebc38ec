"""WER/PER and edit distance."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnserve.models.scoring import edit_distance, error_rates

seqs = st.lists(st.sampled_from("ABCD"), max_size=8)


def test_edit_distance_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["A", "B"]) == 2
    assert edit_distance(["K", "AE", "T"], ["K", "AE", "T"]) == 0


@given(seqs, seqs, seqs)
def test_edit_distance_is_a_metric(a, b, c):
    assert edit_distance(a, b) == edit_distance(b, a)
    assert (edit_distance(a, b) == 0) == (a == b)
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert abs(len(a) - len(b)) <= edit_distance(a, b) <= max(len(a), len(b))


def test_error_rates_accept_any_reference():
    refs = [
        [("T", "AH", "M", "EY", "T", "OW"), ("T", "AH", "M", "AA", "T", "OW")],  # tomato
        [("K", "AE", "T")],
    ]
    rates = error_rates([("T", "AH", "M", "AA", "T", "OW"), ("K", "AA", "T")], refs)
    assert rates["wer"] == 0.5
    # one substitution against the 3 phonemes of "cat"; the right word adds its 6
    assert rates["per"] == pytest.approx(1 / 9)


def test_error_rates_per_uses_closest_reference():
    refs = [[("A", "B", "C", "D"), ("X",)]]
    assert error_rates([("X", "Y")], refs)["per"] == 1.0  # 1 edit / len("X")


def test_error_rates_reject_mismatched_lists():
    with pytest.raises(ValueError):
        error_rates([("A",)], [])
