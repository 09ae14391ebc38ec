"""Token vocabularies shared by training, export and serving (pure Python, no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)
UNKNOWN_LOCALE = "<locale:?>"  # source token for a locale a model was not trained on


def locale_token(locale: str, vocab: Vocab) -> str:
    """The source token for a CLDR locale: its own if the vocabulary has one, else UNKNOWN_LOCALE."""
    tag = f"<locale:{locale}>"
    return tag if tag in vocab else UNKNOWN_LOCALE


@dataclass(frozen=True)
class Vocab:
    """An ordered token list; ids 0, 1, 2 are always <pad>, <s>, </s>."""

    tokens: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {self.tokens[:3]}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary tokens must be unique")
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]]) -> Vocab:
        """Vocabulary of every token seen, specials first, the rest sorted."""
        seen = {tok for seq in sequences for tok in seq}
        return cls(SPECIALS + tuple(sorted(seen - set(SPECIALS))))

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(range(len(SPECIALS)))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids; raises KeyError on a token outside the vocabulary."""
        return [self.index[t] for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to (not including) the first </s>; specials are dropped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i not in self.special_ids:
                out.append(self.tokens[i])
        return out
