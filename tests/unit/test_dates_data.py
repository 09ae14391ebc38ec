"""The CLDR date-normalisation data: splits by date and by locale, real renderings."""

import datetime as dt
from collections import Counter

from attnserve.core.text_forms import normalise
from attnserve.core.vocab import UNKNOWN_LOCALE
from attnserve.models.dates_data import FIRST, LAST, date_split, locales, sample
from attnserve.models.tasks.dates import source_tokens


def test_locales_are_many_and_about_five_percent_are_held_out():
    trained, held_out = locales()
    assert len(trained) + len(held_out) > 1000
    assert not set(trained) & set(held_out)
    assert 0.02 < len(held_out) / (len(trained) + len(held_out)) < 0.08


def test_dates_split_90_5_5_and_samples_keep_to_their_split():
    span = [FIRST + dt.timedelta(n) for n in range(0, (LAST - FIRST).days, 7)]
    counts = Counter(date_split(d) for d in span)
    assert abs(counts["train"] / len(span) - 0.9) < 0.02
    for split in ("dev", "test"):
        for ex in sample(split, 200, seed=1):
            assert date_split(dt.date.fromisoformat(ex.iso)) == split


def test_samples_are_reproducible_real_renderings():
    a, b = sample("train", 300, seed=7), sample("train", 300, seed=7)
    assert a == b and a != sample("train", 300, seed=8)
    assert {ex.style for ex in a} == {"short", "medium", "long", "full"}
    assert len({ex.locale for ex in a}) > 150
    for ex in a:
        day = dt.date.fromisoformat(ex.iso)
        assert FIRST <= day <= LAST and ex.text.strip()
        digits = "".join(c for c in ex.text if c.isascii() and c.isdigit())
        assert str(day.day) in digits or ex.style in ("long", "full")  # CLDR may spell the day out


def test_held_out_locales_use_the_unknown_locale_token_and_the_text_is_read_folded():
    (seen,) = sample("test", 1, seed=0)
    (unseen,) = sample("test", 1, seed=0, held_out_locales=True)
    assert source_tokens(seen)[0] == f"<locale:{seen.locale}>"
    assert source_tokens(unseen)[0] == UNKNOWN_LOCALE
    assert "".join(source_tokens(unseen)[1:]) == normalise(unseen.text, "nfkc", lowercase=True)
