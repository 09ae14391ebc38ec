"""Typed dates: reproducible, kept to their date split, every language, and each names its date."""

import datetime as dt
import re
from collections import Counter

import pytest
from babel.dates import get_month_names

from attnserve.core.text_forms import normalise
from attnserve.models.dates_data import date_split
from attnserve.models.tasks.dates import DatesTask
from attnserve.models.typed_dates import LOCALES, TEMPLATES, language_of, ordinal, sample


def test_samples_are_reproducible_and_keep_to_their_date_split():
    a = sample("dev", 400, seed=3)
    assert a == sample("dev", 400, seed=3) and a != sample("dev", 400, seed=4)
    assert {date_split(dt.date.fromisoformat(e.iso)) for e in a} == {"dev"}


def test_every_language_is_drawn_about_equally_or_as_often_as_it_has_templates():
    counts = Counter(language_of(e) for e in sample("train", 5500, seed=1))
    assert set(counts) == set(LOCALES)
    assert min(counts.values()) > 0.7 * 5500 / len(LOCALES)
    weighted = Counter(language_of(e) for e in sample("train", 20_000, seed=1, by_templates=True))
    share = {lang: len(TEMPLATES[lang]) / sum(len(t) for t in TEMPLATES.values()) for lang in LOCALES}
    for lang, n in weighted.items():
        assert abs(n / 20_000 - share[lang]) < 0.02, lang


def test_each_typed_date_names_its_year_day_and_month():
    for e in sample("test", 3000, seed=2):
        day = dt.date.fromisoformat(e.iso)
        text = normalise(e.text, "nfkc", lowercase=True)  # native digits and any case read as one
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        assert day.year in numbers, e
        assert day.day in numbers, e
        months = {m.lower() for width in ("wide", "abbreviated") for m in
                  [get_month_names(width, "format", e.locale)[day.month]]}  # fmt: skip
        named = any(m.rstrip(".॰") in text for m in months)
        assert named or day.month in numbers, e


@pytest.mark.parametrize(
    ("day", "language", "written"),
    [(1, "en", "1st"), (2, "en", "2nd"), (3, "en", "3rd"), (4, "en", "4th"), (11, "en", "11th"),
     (12, "en", "12th"), (13, "en", "13th"), (21, "en", "21st"), (22, "en", "22nd"), (31, "en", "31st"),
     (1, "fr", "1er"), (2, "fr", "2"), (1, "pt", "1º"), (1, "es", "1º"), (7, "ru", "7")],
)  # fmt: skip
def test_ordinals(day, language, written):
    assert ordinal(day, language) == written


def test_the_task_mixes_typed_dates_into_training_and_scores_them_apart():
    task = DatesTask(train_examples=1000, typed=0.3)
    src, _ = task.vocabularies()
    train = task.train_examples(1)
    typed = {tuple(e.source) for e in task._convert(sample("train", 300, seed=1))}
    assert len(train) == 1000 and typed <= {tuple(e.source) for e in train}
    for split in ("test", "test_typed", "test_unseen_locales", "dev"):
        assert all(t in src for e in task.examples(split) for t in e.source), split  # every text is readable
    assert task.arguments == {"typed": 0.3}
    with pytest.raises(ValueError, match="typed"):
        DatesTask(typed=1.5)
