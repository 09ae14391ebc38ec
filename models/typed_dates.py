"""Dates as people type them, beside CLDR's four formats (no torch).

English and the ten most-spoken languages (Ethnologue: Mandarin, Hindi, Spanish, Arabic, French,
Bengali, Portuguese, Russian, Indonesian, Urdu) each have templates of how dates are typed:
word orders CLDR does not use, ordinals ("7th", "1er", "1º"), "the 7th of March 2024",
leading weekday names, and numeric dates in the locale's field order. Each example is then
varied as typing varies it: any letter case, month and weekday abbreviations with and without
their dot, commas dropped or added, spaces doubled, digits in the script's own numerals.
Month and weekday names come from CLDR (PyPI `babel`). Dates follow `dates_data`'s splits, so
the held-out typed examples show dates no model trained on.
"""

from __future__ import annotations

import random
import re
from functools import cache

from babel import Locale
from babel.dates import get_day_names, get_month_names

from attnserve.models.dates_data import SPLITS, DateExample, _days

LOCALES: dict[str, tuple[str, ...]] = {  # language -> the locales its examples are typed in
    "en": ("en_US", "en_GB", "en_IN"),
    "zh": ("zh",),
    "hi": ("hi",),
    "es": ("es_ES", "es_MX"),
    "ar": ("ar_EG", "ar_SA"),
    "fr": ("fr_FR", "fr_CA"),
    "bn": ("bn",),
    "pt": ("pt_BR", "pt_PT"),
    "ru": ("ru_RU",),
    "id": ("id",),
    "ur": ("ur",),
}
# {d} day, {dd} two-digit day, {o} ordinal day, {M} month number, {MM} two-digit month,
# {MMMM} month name, {MMM} abbreviated month name, {y} year, {EEEE} weekday, {EEE} abbreviated weekday.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "{MMMM} {d} {y}",
        "{MMMM} {d}, {y}",
        "{MMMM} {o}, {y}",
        "{MMMM} {o} {y}",
        "{MMM} {d}, {y}",
        "{MMM} {d} {y}",
        "{MMM} {o}, {y}",
        "{d} {MMMM} {y}",
        "{o} {MMMM} {y}",
        "{o} {MMMM}, {y}",
        "{d} {MMM} {y}",
        "{o} {MMM} {y}",
        "the {o} of {MMMM} {y}",
        "the {o} of {MMMM}, {y}",
        "{o} of {MMMM} {y}",
        "{MMMM} the {o}, {y}",
        "{EEEE}, {MMMM} {d}, {y}",
        "{EEEE} {MMMM} {o} {y}",
        "{EEEE}, {d} {MMMM} {y}",
        "{EEEE} the {o} of {MMMM} {y}",
        "{EEE}, {MMM} {d}, {y}",
        "{EEE} {d} {MMM} {y}",
        "{EEE}, {o} {MMM} {y}",
    ),
    "zh": (
        "{y}年{M}月{d}日",
        "{y}年{M}月{d}号",
        "{y}年{MM}月{dd}日",
        "{y} 年 {M} 月 {d} 日",
        "{y}年{M}月{d}日{EEEE}",
        "{y}年{M}月{d}日 {EEEE}",
        "{y}年{M}月{d}日({EEE})",
        "{y}年{M}月{d}号{EEE}",
    ),
    "hi": (
        "{d} {MMMM} {y}",
        "{d} {MMMM}, {y}",
        "{MMMM} {d}, {y}",
        "{EEEE}, {d} {MMMM} {y}",
        "{EEEE} {d} {MMMM} {y}",
        "{d} {MMM} {y}",
        "{EEE}, {d} {MMM} {y}",
    ),
    "es": (
        "{d} de {MMMM} de {y}",
        "{d} de {MMMM} del {y}",
        "el {d} de {MMMM} de {y}",
        "{o} de {MMMM} de {y}",
        "{d} {MMMM} {y}",
        "{MMMM} {d}, {y}",
        "{MMMM} {d} de {y}",
        "{EEEE}, {d} de {MMMM} de {y}",
        "{EEEE} {d} de {MMMM} del {y}",
        "{d} {MMM} {y}",
        "{d} de {MMM} de {y}",
        "{d}-{MMM}-{y}",
        "{EEE}, {d} {MMM} {y}",
    ),
    "ar": (
        "{d} {MMMM} {y}",
        "{d} {MMMM}، {y}",
        "{EEEE}، {d} {MMMM} {y}",
        "{EEEE} {d} {MMMM} {y}",
        "{d} {MMMM}, {y}",
        "يوم {EEEE} {d} {MMMM} {y}",
    ),
    "fr": (
        "{o} {MMMM} {y}",
        "le {o} {MMMM} {y}",
        "{EEEE} {o} {MMMM} {y}",
        "{EEEE}, {o} {MMMM} {y}",
        "{EEEE} le {o} {MMMM} {y}",
        "{o} {MMM} {y}",
        "{EEE} {o} {MMM} {y}",
        "{o} {MMMM}, {y}",
    ),
    "bn": (
        "{d} {MMMM} {y}",
        "{d} {MMMM}, {y}",
        "{EEEE}, {d} {MMMM} {y}",
        "{EEEE} {d} {MMMM}, {y}",
        "{d} {MMM} {y}",
        "{MMMM} {d}, {y}",
    ),
    "pt": (
        "{o} de {MMMM} de {y}",
        "dia {o} de {MMMM} de {y}",
        "{o} {MMMM} {y}",
        "{EEEE}, {o} de {MMMM} de {y}",
        "{EEEE} {o} de {MMMM} de {y}",
        "{o} de {MMM} de {y}",
        "{o} {MMM} {y}",
        "{EEE}, {o} {MMM} {y}",
    ),
    "ru": (
        "{d} {MMMM} {y}",
        "{d} {MMMM} {y} г.",
        "{d} {MMMM} {y} года",
        "{d} {MMMM} {y}г.",
        "{EEEE}, {d} {MMMM} {y}",
        "{EEEE}, {d} {MMMM} {y} г.",
        "{d} {MMM} {y}",
        "{d} {MMM} {y} г.",
        "{EEE}, {d} {MMM} {y}",
    ),
    "id": (
        "{d} {MMMM} {y}",
        "tanggal {d} {MMMM} {y}",
        "{EEEE}, {d} {MMMM} {y}",
        "{EEEE} {d} {MMMM} {y}",
        "{EEEE}, tanggal {d} {MMMM} {y}",
        "{d} {MMM} {y}",
        "{EEE}, {d} {MMM} {y}",
        "{dd} {MMMM} {y}",
    ),
    "ur": (
        "{d} {MMMM} {y}",
        "{d} {MMMM}، {y}",
        "{EEEE}، {d} {MMMM}، {y}",
        "{EEEE} {d} {MMMM} {y}",
        "{d} {MMMM}, {y}",
    ),
}
NUMERIC_ORDERS = {"en_US": "MDY", "zh": "YMD"}  # every other locale types day, month, year
NATIVE_DIGITS = {"ar": "٠١٢٣٤٥٦٧٨٩", "bn": "০১২৩৪৫৬৭৮৯", "hi": "०१२३४५६७८९", "ur": "۰۱۲۳۴۵۶۷۸۹"}
NUMERIC_SHARE = 0.1  # of each language's examples, numeric (d/m/y with / - or .)


def ordinal(day: int, language: str) -> str:
    """The day as an ordinal where the language writes one ("7th", "1er", "1º"), else the number."""
    if language == "en":
        suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
        return f"{day}{suffix}"
    if day == 1 and language == "fr":
        return "1er"
    if day == 1 and language in ("es", "pt"):
        return "1º"
    return str(day)


@cache
def _names(locale: str) -> dict[str, tuple[str, ...]]:
    """Month (1-12) and weekday (Monday first) names, wide and abbreviated, as CLDR writes dates."""
    days = (0, 1, 2, 3, 4, 5, 6)
    return {
        "MMMM": tuple(get_month_names("wide", "format", locale)[m] for m in range(1, 13)),
        "MMM": tuple(get_month_names("abbreviated", "format", locale)[m] for m in range(1, 13)),
        "EEEE": tuple(get_day_names("wide", "format", locale)[d] for d in days),
        "EEE": tuple(get_day_names("abbreviated", "format", locale)[d] for d in days),
    }


def _dotted(name: str, rng: random.Random) -> str:
    """An abbreviation as CLDR writes it, or half the time with or without a dot."""
    bare = name.rstrip(".॰")
    return rng.choice((bare, bare + ".")) if rng.random() < 0.5 else name


def _numeric(day, locale: str, rng: random.Random) -> str:
    sep = rng.choice("/-.")
    d, m = (f"{day.day:02d}", f"{day.month:02d}") if rng.random() < 0.5 else (str(day.day), str(day.month))
    fields = {"D": d, "M": m, "Y": str(day.year)}
    return sep.join(fields[f] for f in NUMERIC_ORDERS.get(locale, "DMY"))


def _vary(text: str, language: str, rng: random.Random) -> str:
    """Case, commas, spaces and digits as typing varies them."""
    case = rng.random()
    if case < 0.3:
        text = text.lower()
    elif case < 0.45:
        text = text.upper()
    elif case < 0.55:
        text = text.title()
    if rng.random() < 0.2:
        text = text.replace(",", "").replace("،", "")
    if rng.random() < 0.1:
        text = re.sub(r"(\d) ", r"\1, ", text, count=1)
    if rng.random() < 0.1:
        text = text.replace(", ", ",")
    if rng.random() < 0.1:
        text = text.replace(" ", "  ", 1)
    if language in NATIVE_DIGITS and rng.random() < 0.3:
        text = text.translate(str.maketrans("0123456789", NATIVE_DIGITS[language]))
    return re.sub(r"\s+", " ", text).strip() if rng.random() < 0.5 else text


def typed(day, language: str, locale: str, rng: random.Random) -> str:
    """One way a person types `day` in `language`, for a reader in `locale`."""
    if rng.random() < NUMERIC_SHARE:
        return _vary(_numeric(day, locale, rng), language, rng)
    names = _names(locale)
    fields = {
        "d": str(day.day), "dd": f"{day.day:02d}", "o": ordinal(day.day, language), "M": str(day.month),
        "MM": f"{day.month:02d}", "y": str(day.year),
        "MMMM": names["MMMM"][day.month - 1], "MMM": _dotted(names["MMM"][day.month - 1], rng),
        "EEEE": names["EEEE"][day.weekday()], "EEE": _dotted(names["EEE"][day.weekday()], rng),
    }  # fmt: skip
    return _vary(rng.choice(TEMPLATES[language]).format(**fields), language, rng)


def sample(
    split: str, count: int, seed: int, languages: tuple[str, ...] = tuple(LOCALES), by_templates: bool = False
) -> list[DateExample]:
    """`count` typed dates from one date split, reproducibly.

    Args:
        split: the date split ("train", "dev" or "test").
        count: number of examples.
        seed: the sampling seed (the same arguments always give the same examples).
        languages: the languages to draw from (default all of LOCALES).
        by_templates: draw each language as often as it has templates (English has the most
            ways of typing a date), instead of uniformly.

    Raises:
        ValueError: for an unknown split or language.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    unknown = sorted(set(languages) - set(LOCALES))
    if unknown:
        raise ValueError(f"no typed dates for {unknown}; languages: {', '.join(LOCALES)}")
    rng = random.Random(f"typed:{split}:{seed}")
    days = _days(split)
    weights = [len(TEMPLATES[lang]) if by_templates else 1 for lang in languages]
    out = []
    for _ in range(count):
        (language,) = rng.choices(languages, weights) if by_templates else (rng.choice(languages),)
        locale, day = rng.choice(LOCALES[language]), rng.choice(days)
        out.append(DateExample(locale, "typed", typed(day, language, locale, rng), day.isoformat()))
    return out


def language_of(example: DateExample) -> str:
    """The language of an example's locale."""
    return Locale.parse(example.locale).language
