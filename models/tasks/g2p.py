"""Grapheme to phoneme: English words -> ARPAbet (CMUdict)."""

from __future__ import annotations

from typing import ClassVar

from attnserve.core.vocab import Vocab
from attnserve.models import g2p_data
from attnserve.models.tasks.base import TextExample, TextTask


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
