"""The CMUdict task: parsing, stress removal and the split by word."""

from collections import Counter

from attnserve.models.g2p_data import load_cmudict, load_split, parse_cmudict, split_of


def test_parse_strips_stress_merges_variants_and_skips_comments():
    lines = [
        ";;; a comment line",
        "tomato T AH0 M EY1 T OW2",
        "tomato(2) T AH0 M AA1 T OW2",
        "tomato(3) T AH0 M EY1 T OW0  # same as the first once stress is gone",
        "2nd S EH1 K AH0 N D",  # not a word of letters: skipped
        "o'brien OW0 B R AY1 AH0 N",
    ]
    parsed = parse_cmudict(lines)
    assert parsed == {
        "tomato": (("T", "AH", "M", "EY", "T", "OW"), ("T", "AH", "M", "AA", "T", "OW")),
        "o'brien": (("OW", "B", "R", "AY", "AH", "N"),),
    }


def test_split_is_stable_and_close_to_90_5_5():
    words = load_cmudict()
    counts = Counter(split_of(w) for w in words)
    total = sum(counts.values())
    assert total > 120_000
    assert abs(counts["train"] / total - 0.90) < 0.01
    assert abs(counts["dev"] / total - 0.05) < 0.005
    assert abs(counts["test"] / total - 0.05) < 0.005
    assert all(split_of(w) == split_of(w) for w in list(words)[:100])


def test_splits_are_disjoint_and_keep_every_pronunciation_together():
    test = load_split("test")
    dev_words = {e.word for e in load_split("dev")}
    assert not dev_words & {e.word for e in test}
    full = load_cmudict()
    assert all(e.pronunciations == full[e.word] for e in test)
    assert any(len(e.pronunciations) > 1 for e in test)
    assert all(not any(p[-1].isdigit() for p in pron) for e in test for pron in e.pronunciations)
