"""Text-to-text tasks: where examples come from, how sources are tokenised, how output is scored.

A task knows nothing of the model family; training, export and evaluation take one of these.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from attnserve.models import dates_data, g2p_data
from attnserve.models.evaluate import predict
from attnserve.models.scoring import error_rates
from attnserve.service.runtime.decoding import SourceBatch, StepModel, pad_batch
from attnserve.service.vocab import UNKNOWN_LOCALE, Vocab

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

    def __init__(self, train_examples: int = 0):
        self.train_size = train_examples or self.sizes["train"]

    def _convert(self, items: list[dates_data.DateExample]) -> list[TextExample]:
        known = frozenset(dates_data.locales()[0])
        return [TextExample(tuple(e.source_tokens(known)), (tuple(e.iso),)) for e in items]

    def examples(self, split: str) -> list[TextExample]:
        if split == "test_unseen_locales":
            return self._convert(dates_data.sample("test", self.sizes[split], seed=0, held_out_locales=True))
        count = self.train_size if split == "train" else self.sizes[split]
        return self._convert(dates_data.sample(split, count, seed=0))

    def train_examples(self, epoch: int) -> list[TextExample]:
        return self._convert(dates_data.sample("train", self.train_size, seed=epoch))

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


class ParallelTextTask(TextTask):
    """Your own parallel text: a UTF-8 TSV file of `source<TAB>target` lines (`#` starts a comment).

    Pairs are split 90/5/5 train/dev/test by a hash of the source, so every target of one source
    stays in one split. Sources and targets are read as characters or as whitespace-separated
    words; limits are set from the longest training pair.
    """

    name = "parallel-text"
    primary, minimise = "wer", True

    def __init__(self, path: str | Path, tokens: str = "chars"):
        if tokens not in ("chars", "words"):
            raise ValueError(f"tokens must be 'chars' or 'words', got {tokens!r}")
        self.path, self.tokens = Path(path), tokens
        self.description = f"parallel text from {self.path.name} ({tokens})"
        self.source_spec = {"tokenizer": "characters" if tokens == "chars" else "words", "lowercase": False}
        self.target_separator = "" if tokens == "chars" else " "
        self._splits = _read_pairs(self.path, tokens)
        longest = max((len(e.source), max(len(r) for r in e.references)) for e in self._splits["train"])
        self.max_source_tokens, self.max_output_tokens = longest[0] + longest[0] // 2, longest[1] * 2

    @property
    def arguments(self) -> dict:
        return {"path": str(self.path.resolve()), "tokens": self.tokens}

    def examples(self, split: str) -> list[TextExample]:
        return self._splits[split]


def _read_pairs(path: Path, tokens: str) -> dict[str, list[TextExample]]:
    """Examples per split from a TSV of pairs.

    Raises:
        ValueError: for a line without exactly one tab, or a split left empty.
    """
    split = (lambda text: tuple(text)) if tokens == "chars" else (lambda text: tuple(text.split()))
    refs: dict[str, list[tuple[str, ...]]] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line!r}")
        source, target = (f.strip() for f in fields)
        refs.setdefault(source, []).append(split(target))
    out: dict[str, list[TextExample]] = {s: [] for s in ("train", "dev", "test")}
    for source, targets in refs.items():
        out[g2p_data.split_of(source)].append(TextExample(split(source), tuple(dict.fromkeys(targets))))
    empty = [s for s, examples in out.items() if not examples]
    if empty:
        raise ValueError(
            f"{path}: too few pairs; splits {empty} are empty (about 20 pairs or more are needed)"
        )
    return out


@cache
def _date_vocabularies() -> tuple[Vocab, Vocab]:
    trained, _ = dates_data.locales()
    days = [dt.date(2024, month, day) for month in range(1, 13) for day in (1, 15, 28)]  # every weekday too
    chars = {c for loc in trained for style in dates_data.FORMATS for d in days
             for c in dates_data.format_date(d, style, locale=loc)}  # fmt: skip
    tags = {f"<locale:{loc}>" for loc in trained} | {UNKNOWN_LOCALE}
    return Vocab.build([chars | tags | set("0123456789")]), Vocab.build(["0123456789-"])
