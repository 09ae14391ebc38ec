"""Source tokenisation by a manifest's tokenizer, shared by training and serving (no torch).

Text is read as characters, whitespace-separated words, or SentencePiece subwords. Subword
models trained with byte fallback can spell any text: characters outside their pieces become
byte pieces such as `<0xE2>`, so every input is readable.
"""

from __future__ import annotations

from collections.abc import Sequence

import sentencepiece as spm

MODEL_FILE = "subwords.model"  # the tokenizer's file name inside a model-repository entry
TOKENIZERS = ("characters", "words", "sentencepiece")


class Subwords:
    """A SentencePiece model: text -> pieces -> text."""

    def __init__(self, model: bytes):
        self.model = model
        self._sp = spm.SentencePieceProcessor(model_proto=model)

    @property
    def pieces(self) -> tuple[str, ...]:
        """Every piece, by id."""
        return tuple(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))

    def encode(self, text: str) -> tuple[str, ...]:
        """The pieces of a text."""
        return tuple(self._sp.encode(text, out_type=str))

    def decode(self, pieces: Sequence[str]) -> str:
        """The text the pieces spell."""
        return self._sp.decode_pieces(list(pieces))


def tokenize(text: str, tokenizer: str, subwords: Subwords | None = None) -> tuple[str, ...]:
    """The tokens of a text under one of TOKENIZERS (sentencepiece needs `subwords`)."""
    if tokenizer == "sentencepiece":
        return subwords.encode(text)
    return tuple(text.split()) if tokenizer == "words" else tuple(text)
