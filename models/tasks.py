"""Text-to-text tasks: where examples come from, how sources are tokenised, how output is scored.

A task knows nothing of the model family; training, export and evaluation take one of these.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import numpy as np

from attnserve.models import dates_data, g2p_data
from attnserve.models.evaluate import predict
from attnserve.models.scoring import error_rates
from attnserve.service.core.decoding import SourceBatch, StepModel, pad_batch
from attnserve.service.core.vocab import UNKNOWN_LOCALE, Vocab

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class TextExample:
    """A source token sequence and every acceptable output token sequence."""

    source: tuple[str, ...]
    references: tuple[tuple[str, ...], ...]


class TextTask:
    """Base class: subclasses set the class attributes and implement `examples`."""

    name: str
    description: str
    max_source_tokens: int
    max_output_tokens: int
    primary: str  # metric that selects the best checkpoint
    minimise: bool
    eval_splits: tuple[str, ...] = ("test",)
    source_spec: ClassVar[dict] = {}
    target_separator: str = " "

    def examples(self, split: str) -> list[TextExample]:
        """The examples of one split ("train", "dev", "test" or one of eval_splits)."""
        raise NotImplementedError

    def train_examples(self, epoch: int) -> list[TextExample]:
        """Examples for one training epoch (the same every epoch unless the task generates them)."""
        return self.examples("train")

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """(source, target) vocabularies from the training data."""
        train = self.examples("train")
        return (
            Vocab.build(e.source for e in train),
            Vocab.build(r for e in train for r in e.references),
        )

    def score(self, predictions: list[list[str]], examples: list[TextExample]) -> dict[str, float]:
        """Word (sequence) and token error rates against any reference."""
        return error_rates(predictions, [e.references for e in examples])

    def evaluate_model(
        self,
        model: StepModel,
        split: str,
        src_vocab: Vocab,
        tgt_vocab: Vocab,
        limit: int = 0,
        progress: bool = False,
        beam_size: int = 1,
    ) -> dict[str, float]:
        """The task's metrics for the model on a split (sources it cannot read count as wrong)."""
        examples = self.examples(split)[: limit or None]
        preds = predict(
            model, [e.source for e in examples], src_vocab, tgt_vocab, self.max_output_tokens,
            progress=progress, beam_size=beam_size,
        )  # fmt: skip
        metrics = self.score([p or [] for p in preds], examples)
        unreadable = sum(p is None for p in preds)
        return {**metrics, "unreadable": float(unreadable)} if unreadable else metrics

    @property
    def arguments(self) -> dict:
        """What `task()` needs besides the name to rebuild this task (stored in checkpoints)."""
        return {}

    def model_fields(self) -> dict:
        """Model config fields the data fixes (an image model's input size)."""
        return {}

    def assets(self) -> dict[str, bytes]:
        """Files an exported model ships beside its graphs (a tokenizer), by file name."""
        return {}

    def source_section(self, src_vocab: Vocab, config) -> dict:
        """The manifest's `source`: how the service tokenises text for this model."""
        return {**self.source_spec, "vocab": list(src_vocab.tokens), "max_tokens": self.max_source_tokens}

    def source_batches(self, split: str, count: int, batch_size: int, src_vocab: Vocab) -> list[SourceBatch]:
        """The first `count` readable sources of a split, in batches (parity checks)."""
        ids = [
            src_vocab.encode(e.source) for e in self.examples(split) if all(t in src_vocab for t in e.source)
        ]
        ids = ids[:count]
        return [SourceBatch.from_ids(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]

    def train_batches(
        self,
        epoch: int,
        batch_size: int,
        rng: random.Random,
        src_vocab: Vocab,
        tgt_vocab: Vocab,
        limit: int = 0,
    ) -> list[Batch]:
        """Shuffled batches of every (source, reference) pair, bucketed by length to cut padding.

        Each batch holds src_ids/src_mask (B, S) and tgt_in/tgt_out (B, T) (<s>-shifted and
        </s>-terminated targets).
        """
        examples = self.train_examples(epoch)[: limit or None]
        pairs = [(src_vocab.encode(e.source), tgt_vocab.encode(r)) for e in examples for r in e.references]
        order = list(range(len(pairs)))
        rng.shuffle(order)
        pool = batch_size * 50
        groups = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: len(pairs[i][0]))
            groups += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(groups)
        return [_text_batch([pairs[i] for i in g], tgt_vocab) for g in groups]


class G2PTask(TextTask):
    """English word -> ARPAbet phonemes (CMUdict, stress removed)."""

    name = "g2p"
    description = "English word -> ARPAbet phonemes (stress removed), CMU Pronouncing Dictionary"
    max_source_tokens = 32
    max_output_tokens = 32
    primary, minimise = "wer", True
    source_spec: ClassVar[dict] = {"tokenizer": "characters", "lowercase": True}

    def examples(self, split: str) -> list[TextExample]:
        return [TextExample(tuple(e.word), e.pronunciations) for e in g2p_data.load_split(split)]

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """Letters of every word (the alphabet is closed), phonemes of the training words."""
        words = [e.source for split in ("train", "dev", "test") for e in self.examples(split)]
        return Vocab.build(words), super().vocabularies()[1]


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
        rates = super().score(predictions, examples)
        return {"exact_match": 1 - rates["wer"], "cer": rates["per"], "examples": rates["words"]}


def target_arrays(targets: list[list[int]], tgt_vocab: Vocab) -> Batch:
    """Teacher-forcing arrays: tgt_in (B, T) starts with <s>, tgt_out (B, T) ends with </s>."""
    tgt_in, _ = pad_batch([[tgt_vocab.bos_id, *t] for t in targets])
    tgt_out, _ = pad_batch([[*t, tgt_vocab.eos_id] for t in targets])
    return {"tgt_in": tgt_in, "tgt_out": tgt_out}


def _text_batch(pairs: list[tuple[list[int], list[int]]], tgt_vocab: Vocab) -> Batch:
    """Padded arrays for one batch of (source ids, target ids) pairs."""
    src_ids, src_mask = pad_batch([s for s, _ in pairs])  # (B, S)
    return {"src_ids": src_ids, "src_mask": src_mask, **target_arrays([t for _, t in pairs], tgt_vocab)}


@cache
def _date_vocabularies() -> tuple[Vocab, Vocab]:
    trained, _ = dates_data.locales()
    days = [dt.date(2024, month, day) for month in range(1, 13) for day in (1, 15, 28)]  # every weekday too
    chars = {c for loc in trained for style in dates_data.FORMATS for d in days
             for c in dates_data.format_date(d, style, locale=loc)}  # fmt: skip
    tags = {f"<locale:{loc}>" for loc in trained} | {UNKNOWN_LOCALE}
    return Vocab.build([chars | tags | set("0123456789")]), Vocab.build(["0123456789-"])
