"""Date normalisation: a date written as in a CLDR locale -> ISO 8601."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import ClassVar

from attnserve.core.vocab import UNKNOWN_LOCALE, Vocab
from attnserve.models import dates_data
from attnserve.models.sequence_errors import sequence_errors
from attnserve.models.tasks.base import TextExample, TextTask


class DatesTask(TextTask):
    """A date written as in a CLDR locale -> ISO 8601, with a locale token before the characters.

    Training examples are drawn afresh every epoch; dev and test are fixed samples of held-out
    dates, and `test_unseen_locales` uses only locales never trained on.
    """

    name = "dates"
    description = "Date as written in a CLDR locale (babel) -> ISO 8601 YYYY-MM-DD"
    max_source_tokens = 64
    max_output_tokens = 10
    primary, minimise = "exact_match", False
    target_separator = ""
    eval_splits = ("test", "test_unseen_locales")
    source_spec: ClassVar[dict] = {"tokenizer": "characters", "lowercase": False, "locale_token": True}
    sizes: ClassVar[dict[str, int]] = {
        "train": 100_000,
        "dev": 2_000,
        "test": 5_000,
        "test_unseen_locales": 2_000,
    }

    def __init__(self, train_examples: int = 0, language_balance: float = 0.0):
        self.train_size = train_examples or self.sizes["train"]
        self.language_balance = language_balance

    @property
    def arguments(self) -> dict:
        return {"language_balance": self.language_balance} if self.language_balance else {}

    def _convert(self, items: list[dates_data.DateExample]) -> list[TextExample]:
        known = frozenset(dates_data.locales()[0])
        return [TextExample(tuple(e.source_tokens(known)), (tuple(e.iso),)) for e in items]

    def examples(self, split: str) -> list[TextExample]:
        if split == "test_unseen_locales":
            return self._convert(dates_data.sample("test", self.sizes[split], seed=0, held_out_locales=True))
        count = self.train_size if split == "train" else self.sizes[split]
        return self._convert(dates_data.sample(split, count, seed=0))

    def train_examples(self, epoch: int) -> list[TextExample]:
        return self._convert(
            dates_data.sample("train", self.train_size, seed=epoch, language_balance=self.language_balance)
        )

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


@cache
def _date_vocabularies() -> tuple[Vocab, Vocab]:
    trained, _ = dates_data.locales()
    days = [dt.date(2024, month, day) for month in range(1, 13) for day in (1, 15, 28)]  # every weekday too
    chars = {c for loc in trained for style in dates_data.FORMATS for d in days
             for c in dates_data.format_date(d, style, locale=loc)}  # fmt: skip
    tags = {f"<locale:{loc}>" for loc in trained} | {UNKNOWN_LOCALE}
    return Vocab.build([chars | tags | set("0123456789")]), Vocab.build(["0123456789-"])
