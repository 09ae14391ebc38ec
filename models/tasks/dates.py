"""Date normalisation: a date written as in a CLDR locale, or typed as people type it -> ISO 8601."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import ClassVar

from attnserve.core.text_forms import normalise
from attnserve.core.vocab import UNKNOWN_LOCALE, Vocab
from attnserve.models import dates_data, typed_dates
from attnserve.models.sequence_errors import sequence_errors
from attnserve.models.tasks.base import TextExample, TextTask


class DatesTask(TextTask):
    """A date written as in a CLDR locale -> ISO 8601, with a locale token before the characters.

    The text is read in the `nfkc` text form, lowercased. Training examples are drawn afresh every
    epoch, `typed` of them typed as people type dates (`typed_dates`); dev and test are fixed
    samples of held-out dates: `test` in CLDR's formats, `test_typed` typed, and
    `test_unseen_locales` in locales never trained on. Dev holds both kinds.
    """

    name = "dates"
    description = "Date as written in a CLDR locale (babel) or as typed -> ISO 8601 YYYY-MM-DD"
    max_source_tokens = 64
    max_output_tokens = 10
    primary, minimise = "exact_match", False
    target_separator = ""
    eval_splits = ("test", "test_typed", "test_unseen_locales")
    source_spec: ClassVar[dict] = {
        "tokenizer": "characters",
        "lowercase": True,
        "text_form": "nfkc",
        "locale_token": True,
    }
    sizes: ClassVar[dict[str, int]] = {
        "train": 100_000,
        "dev": 2_000,
        "dev_typed": 1_100,
        "test": 5_000,
        "test_typed": 5_500,
        "test_unseen_locales": 2_000,
    }

    def __init__(
        self,
        train_examples: int = 0,
        language_balance: float = 0.0,
        typed: float = 0.0,
        typed_by_templates: bool = False,
    ):
        if not 0.0 <= typed <= 1.0:
            raise ValueError(f"typed must be in [0, 1], got {typed}")
        self.train_size = train_examples or self.sizes["train"]
        self.language_balance = language_balance
        self.typed = typed
        self.typed_by_templates = typed_by_templates

    @property
    def arguments(self) -> dict:
        given = {
            "language_balance": self.language_balance,
            "typed": self.typed,
            "typed_by_templates": self.typed_by_templates,
        }
        return {k: v for k, v in given.items() if v}

    def _convert(self, items: list[dates_data.DateExample]) -> list[TextExample]:
        return [TextExample(tuple(source_tokens(e)), (tuple(e.iso),)) for e in items]

    def examples(self, split: str) -> list[TextExample]:
        if split == "test_unseen_locales":
            return self._convert(dates_data.sample("test", self.sizes[split], seed=0, held_out_locales=True))
        if split == "test_typed":
            return self._convert(typed_dates.sample("test", self.sizes[split], seed=0))
        if split == "dev":
            return self._convert(
                dates_data.sample("dev", self.sizes["dev"], seed=0)
                + typed_dates.sample("dev", self.sizes["dev_typed"], seed=0)
            )
        count = self.train_size if split == "train" else self.sizes[split]
        return self._convert(dates_data.sample(split, count, seed=0))

    def train_examples(self, epoch: int) -> list[TextExample]:
        typed = round(self.train_size * self.typed)
        cldr = dates_data.sample(
            "train", self.train_size - typed, seed=epoch, language_balance=self.language_balance
        )
        by_templates = self.typed_by_templates
        return self._convert(cldr + typed_dates.sample("train", typed, seed=epoch, by_templates=by_templates))

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """Every character any trained locale writes for a month or weekday, and the locale tokens."""
        return _date_vocabularies()

    def score(self, predictions: list[list[str]], examples: list[TextExample]) -> dict[str, float]:
        """Exact match and character error rate against the ISO date."""
        errors = sequence_errors(predictions, [e.references for e in examples])
        return {
            "exact_match": 1 - errors.sequence_error_rate,
            "cer": errors.token_error_rate,
            "examples": float(errors.sequences),
        }


def _folded(text: str) -> str:
    return normalise(text, "nfkc", lowercase=True)


@cache
def _trained_locales() -> frozenset[str]:
    return frozenset(dates_data.locales()[0])


def source_tokens(example: dates_data.DateExample) -> list[str]:
    """The locale token (or the unknown-locale token) and the characters, as the model reads them."""
    tag = f"<locale:{example.locale}>" if example.locale in _trained_locales() else UNKNOWN_LOCALE
    return [tag, *_folded(example.text)]


@cache
def _date_vocabularies() -> tuple[Vocab, Vocab]:
    trained, _ = dates_data.locales()
    days = [dt.date(2024, month, day) for month in range(1, 13) for day in (1, 15, 28)]  # every weekday too
    cldr = {dates_data.format_date(d, style, locale=loc) for loc in trained for style in dates_data.FORMATS
            for d in days}  # fmt: skip
    typed = {e.text for e in typed_dates.sample("train", 20_000, seed=0)}
    chars = {c for text in cldr | typed for c in _folded(text)}
    tags = {f"<locale:{loc}>" for loc in trained} | {UNKNOWN_LOCALE}
    return Vocab.build([chars | tags | set("0123456789")]), Vocab.build(["0123456789-"])
