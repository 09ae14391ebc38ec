"""Your own parallel text: a TSV of `source<TAB>target` pairs read as characters, words or subwords."""

from __future__ import annotations

import hashlib
import io
import lzma
from pathlib import Path

import sentencepiece as spm

from attnserve.core.subwords import MODEL_FILE, Subwords, tokenize
from attnserve.core.vocab import Vocab
from attnserve.models import g2p_data
from attnserve.models.tasks.base import TextExample, TextTask

READERS = {"chars": "characters", "words": "words", "subwords": "sentencepiece"}  # --tokens -> tokenizer


class ParallelTextTask(TextTask):
    """Pairs from a UTF-8 TSV file (or .tsv.xz); `#` starts a comment line.

    Every target of one source stays in one split: 90/5/5 train/dev/test by a hash of the source,
    or with `held_out`, that many sources each for test and dev (by the same hash). With
    `tokens="subwords"` a SentencePiece model of `vocab_size` pieces is trained on the training
    split (source and target sides together), shipped with the exported model, and the output is
    scored with BLEU and chrF (sacrebleu); otherwise with WER and token error rate.
    """

    name = "parallel-text"

    def __init__(self, path: str | Path, tokens: str = "chars", vocab_size: int = 8000, held_out: int = 0):
        if tokens not in READERS:
            raise ValueError(f"tokens must be one of {sorted(READERS)}, got {tokens!r}")
        self.path, self.tokens, self.vocab_size, self.held_out = Path(path), tokens, vocab_size, held_out
        self.description = f"parallel text from {self.path.name} ({tokens})"
        self.source_spec = {"tokenizer": READERS[tokens], "lowercase": False}
        self.target_separator = " " if tokens == "words" else ""
        self.primary, self.minimise = ("bleu", False) if tokens == "subwords" else ("wer", True)
        texts = split_pairs(read_pairs(self.path), held_out, self.path)
        self.subwords = None
        if tokens == "subwords":
            train = [t for source, targets in texts["train"] for t in (source, *targets)]
            self.subwords = Subwords(train_subwords(train, vocab_size))
        self._splits = {
            split: [TextExample(self._tokenize(s), tuple(map(self._tokenize, refs))) for s, refs in items]
            for split, items in texts.items()
        }
        longest = max((len(e.source), max(len(r) for r in e.references)) for e in self._splits["train"])
        self.max_source_tokens, self.max_output_tokens = longest[0] + longest[0] // 2, longest[1] * 2

    def _tokenize(self, text: str) -> tuple[str, ...]:
        return tokenize(text, READERS[self.tokens], self.subwords)

    @property
    def arguments(self) -> dict:
        args = {"path": portable(self.path), "tokens": self.tokens}
        if self.tokens == "subwords":
            args["vocab_size"] = self.vocab_size
        return {**args, "held_out": self.held_out} if self.held_out else args

    def examples(self, split: str) -> list[TextExample]:
        return self._splits[split]

    def vocabularies(self) -> tuple[Vocab, Vocab]:
        """Every subword piece on both sides, else the tokens of the training split."""
        if self.subwords:
            vocab = Vocab(self.subwords.pieces)
            return vocab, vocab
        return super().vocabularies()

    def assets(self) -> dict[str, bytes]:
        return {MODEL_FILE: self.subwords.model} if self.subwords else {}

    def score(self, predictions: list[list[str]], examples: list[TextExample]) -> dict[str, float]:
        """BLEU and chrF of the detokenised text for subwords, else error rates."""
        if not self.subwords:
            return super().score(predictions, examples)
        import sacrebleu

        hypotheses = [self.subwords.decode(p) for p in predictions]
        refs = [[self.subwords.decode(r) for r in e.references] for e in examples]
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
        return {
            "bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
            "examples": float(len(examples)),
        }


def portable(path: Path) -> str:
    """A data path as task arguments record it: relative to the working directory when inside it
    (a repository's own data stays valid in any clone), else absolute."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)


def train_subwords(texts: list[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model with byte fallback; the same texts give the same bytes.

    Ids 0-3 are <pad>, <s>, </s>, <unk>, matching `Vocab`, then the 256 byte pieces. A vocab_size
    larger than the text supports is lowered to what it does.

    Raises:
        ValueError: if vocab_size cannot hold the byte pieces and the text's characters.
    """
    model = io.BytesIO()
    try:
        _train_sentencepiece(texts, vocab_size, model)
    except RuntimeError as e:
        raise ValueError(f"cannot train {vocab_size} subwords: {str(e).split('] ')[-1]}") from None
    return model.getvalue()


def _train_sentencepiece(texts: list[str], vocab_size: int, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sorted(set(texts))),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )  # fmt: skip


def read_pairs(path: Path) -> dict[str, list[str]]:
    """Source -> its distinct targets, in file order.

    Raises:
        ValueError: for a line without exactly one tab or with an empty side.
    """
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    refs: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line!r}")
        source, target = (f.strip() for f in fields)
        refs.setdefault(source, [])
        if target not in refs[source]:
            refs[source].append(target)
    return refs


Split = list[tuple[str, list[str]]]  # (source, its targets)


def split_pairs(refs: dict[str, list[str]], held_out: int, path: Path) -> dict[str, Split]:
    """(source, targets) per split.

    Raises:
        ValueError: if a split would be empty.
    """
    out: dict[str, Split] = {s: [] for s in ("train", "dev", "test")}
    if held_out:
        order = sorted(refs, key=lambda s: hashlib.sha256(s.encode("utf-8")).hexdigest())
        for rank, source in enumerate(order):
            split = "test" if rank < held_out else "dev" if rank < 2 * held_out else "train"
            out[split].append((source, refs[source]))
    else:
        for source, targets in refs.items():
            out[g2p_data.split_of(source)].append((source, targets))
    empty = [s for s, items in out.items() if not items]
    if empty:
        raise ValueError(f"{path}: too few pairs; splits {empty} are empty (about 20 pairs or more needed)")
    return out
