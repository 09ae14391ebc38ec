"""Edit distance, and sequence and token error rates against several references."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnserve.models.sequence_errors import edit_distance, sequence_errors

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


def test_sequence_errors_accept_any_reference():
    refs = [
        [("T", "AH", "M", "EY", "T", "OW"), ("T", "AH", "M", "AA", "T", "OW")],  # tomato
        [("K", "AE", "T")],
    ]
    errors = sequence_errors([("T", "AH", "M", "AA", "T", "OW"), ("K", "AA", "T")], refs)
    assert errors.sequence_error_rate == 0.5
    # one substitution against the 3 phonemes of "cat"; the right word adds its 6
    assert errors.token_error_rate == pytest.approx(1 / 9)
    assert errors.sequences == 2


def test_token_error_rate_uses_closest_reference():
    refs = [[("A", "B", "C", "D"), ("X",)]]
    assert sequence_errors([("X", "Y")], refs).token_error_rate == 1.0  # 1 edit / len("X")


def test_sequence_errors_reject_mismatched_lists():
    with pytest.raises(ValueError):
        sequence_errors([("A",)], [])


def test_tasks_record_the_errors_under_their_own_metric_names():
    from attnserve.models.tasks.base import TextExample
    from attnserve.models.tasks.dates import DatesTask
    from attnserve.models.tasks.g2p import G2PTask
    from attnserve.models.tasks.image_captions import ImageCaptionTask

    examples = [TextExample(tuple("cat"), (("K", "AE", "T"),)), TextExample(tuple("ox"), (("AA", "K", "S"),))]
    predictions = [["K", "AE", "T"], ["AA", "K"]]  # one right; one edit in 6 reference tokens
    per = pytest.approx(1 / 6)
    assert G2PTask().score(predictions, examples) == {"wer": 0.5, "per": per, "words": 2.0}
    assert DatesTask().score(predictions, examples) == {"exact_match": 0.5, "cer": per, "examples": 2.0}
    captions = object.__new__(ImageCaptionTask)  # scoring reads no images
    assert captions.score(predictions, examples) == {
        "exact_match": 0.5,
        "word_error_rate": per,
        "examples": 2.0,
    }
