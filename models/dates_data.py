"""Date normalisation from CLDR (PyPI `babel`): human-written dates -> ISO `YYYY-MM-DD` (no torch).

Every babel locale renders dates 1950-01-01 .. 2049-12-31 in the four standard formats (short,
medium, long, full). Dates are split 90/5/5 train/dev/test by a hash of the ISO date, and 5 % of
the locales (by a hash of their identifier) are held out entirely, so a model can be scored on
unseen dates of trained locales and on locales it never saw.

The model reads a locale token before the text (`tasks.dates.source_tokens`): short numeric
formats are ambiguous without it ("3/7/24" is March 7 in en_US and 7 March in hi). Held-out
locales get the `<locale:?>` token.
Two-digit years follow the range: 50-99 -> 19xx, 00-49 -> 20xx.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass
from functools import cache

from babel import localedata
from babel.dates import format_date

FORMATS = ("short", "medium", "long", "full")
FIRST, LAST = dt.date(1950, 1, 1), dt.date(2049, 12, 31)
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class DateExample:
    """One rendered date and its ISO form."""

    locale: str
    style: str
    text: str
    iso: str


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100


def date_split(day: dt.date) -> str:
    """train / dev / test for a date, 90/5/5 by a hash of its ISO form."""
    bucket = _bucket(day.isoformat())
    return "train" if bucket < 90 else "dev" if bucket < 95 else "test"


@cache
def locales() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trained locales, held-out locales): every babel locale, 5 % held out by hash."""
    ids = sorted(localedata.locale_identifiers())
    held_out = tuple(i for i in ids if _bucket("locale:" + i) < 5)
    return tuple(i for i in ids if i not in held_out), held_out


@cache
def _days(split: str) -> tuple[dt.date, ...]:
    span = (LAST - FIRST).days + 1
    return tuple(d for d in (FIRST + dt.timedelta(n) for n in range(span)) if date_split(d) == split)


@cache
def _by_language(held_out: bool) -> tuple[tuple[str, ...], ...]:
    """The trained (or held-out) locales grouped by language (the identifier's first part)."""
    groups: dict[str, list[str]] = {}
    for locale in locales()[1 if held_out else 0]:
        groups.setdefault(locale.split("_")[0], []).append(locale)
    return tuple(tuple(g) for g in groups.values())


def sample(
    split: str, count: int, seed: int, held_out_locales: bool = False, language_balance: float = 0.0
) -> list[DateExample]:
    """`count` examples of random (locale, date, style) from one date split, reproducibly.

    Locales are drawn uniformly, so a language with many regional locales (English has over a
    hundred) is drawn far more often than one with a single locale; `language_balance` draws that
    fraction of the examples from a uniformly chosen language instead.

    Args:
        split: the date split ("train", "dev" or "test").
        count: number of examples.
        seed: the sampling seed (the same arguments always give the same examples).
        held_out_locales: draw locales from the held-out set instead of the trained one.
        language_balance: fraction of examples whose language, not locale, is drawn uniformly.

    Raises:
        ValueError: for an unknown split or a balance outside [0, 1].
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 <= language_balance <= 1.0:
        raise ValueError(f"language_balance must be in [0, 1], got {language_balance}")
    rng = random.Random(f"{split}:{seed}:{held_out_locales}")
    pool = locales()[1 if held_out_locales else 0]
    days = _days(split)
    out = []
    for _ in range(count):
        balanced = language_balance and rng.random() < language_balance  # no draw when off
        locale = rng.choice(rng.choice(_by_language(held_out_locales))) if balanced else rng.choice(pool)
        day, style = rng.choice(days), rng.choice(FORMATS)
        out.append(DateExample(locale, style, format_date(day, style, locale=locale), day.isoformat()))
    return out
