"""The task base: where examples come from, how sources are tokenised, how output is scored.

A task knows nothing of the model family; training, export and evaluation take one of these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from attnserve.core.decoding import StepModel
from attnserve.core.sources import SourceBatch, pad_batch
from attnserve.core.vocab import Vocab
from attnserve.models.predict import predict
from attnserve.models.sequence_errors import sequence_errors

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
        """Sequence and token error rates against any reference, recorded as wer (share of outputs
        that match no reference), per (token edits per reference token) and words (how many)."""
        errors = sequence_errors(predictions, [e.references for e in examples])
        return {
            "wer": errors.sequence_error_rate,
            "per": errors.token_error_rate,
            "words": float(errors.sequences),
        }

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


def target_arrays(targets: list[list[int]], tgt_vocab: Vocab) -> Batch:
    """Teacher-forcing arrays: tgt_in (B, T) starts with <s>, tgt_out (B, T) ends with </s>."""
    tgt_in, _ = pad_batch([[tgt_vocab.bos_id, *t] for t in targets])
    tgt_out, _ = pad_batch([[*t, tgt_vocab.eos_id] for t in targets])
    return {"tgt_in": tgt_in, "tgt_out": tgt_out}


def _text_batch(pairs: list[tuple[list[int], list[int]]], tgt_vocab: Vocab) -> Batch:
    """Padded arrays for one batch of (source ids, target ids) pairs."""
    src_ids, src_mask = pad_batch([s for s, _ in pairs])  # (B, S)
    return {"src_ids": src_ids, "src_mask": src_mask, **target_arrays([t for _, t in pairs], tgt_vocab)}
