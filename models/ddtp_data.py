"""English-French sentence pairs from Debian's translated package descriptions (DDTP).

Debian publishes every package description in English (`Translation-en`) and, where volunteers
translated it, in French (`Translation-fr`); entries with the same `Description-md5` describe the
same text. A pair is a short description, or one sentence of a long description whose paragraphs
and sentences line up one to one. The archive changes over time, so the bundled model trains on a
snapshot written by this module (`python -m attnserve.models.ddtp_data --out FILE.tsv.xz`), whose
header records where and when it was taken.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import lzma
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
MAX_CHARS = 250  # longer sentences (1% of them) cost training time and often do not line up
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-Ý«\"(])")


def parse_translations(text: str, lang: str) -> dict[str, tuple[str, list[str]]]:
    """Description-md5 -> (short description, lines of the long description) of one index."""
    out = {}
    field = f"Description-{lang}:"
    for block in text.split("\n\n"):
        md5, short, body = None, None, []
        for line in block.split("\n"):
            if line.startswith("Description-md5:"):
                md5 = line.split(":", 1)[1].strip()
            elif line.startswith(field):
                short = line.split(":", 1)[1].strip()
            elif line.startswith(" ") and short is not None:
                body.append(line[1:])
        if md5 and short:
            out[md5] = (short, body)
    return out


def _clean(text: str) -> str:
    """Whitespace collapsed to single spaces (no-break spaces included)."""
    return " ".join(text.split())


def _paragraphs(lines: list[str]) -> list[str]:
    """Paragraphs of a long description (a line holding only "." separates them)."""
    paragraphs, current = [], []
    for line in [*lines, "."]:
        if line.strip() == ".":
            paragraphs.append(_clean(" ".join(current)))
            current = []
        else:
            current.append(line)
    return paragraphs


def _plausible(en: str, fr: str) -> bool:
    """Both sides present, not too long, and of similar length (sentence splits that went astray
    usually are not)."""
    return bool(en and fr) and len(en) <= MAX_CHARS and 0.5 <= len(fr) / len(en) <= 2.5


def pair(english: dict, french: dict) -> Iterator[tuple[str, str]]:
    """(English, French) pairs of every description present in both indexes, in md5 order."""
    for md5 in sorted(english.keys() & french.keys()):
        (en_short, en_body), (fr_short, fr_body) = english[md5], french[md5]
        yield _clean(en_short), _clean(fr_short)
        en_paras, fr_paras = _paragraphs(en_body), _paragraphs(fr_body)
        if len(en_paras) != len(fr_paras):
            continue
        for en_para, fr_para in zip(en_paras, fr_paras, strict=True):
            en_sents, fr_sents = _SENTENCE_END.split(en_para), _SENTENCE_END.split(fr_para)
            if len(en_sents) == len(fr_sents):
                yield from zip(en_sents, fr_sents, strict=True)


def unique_pairs(english: dict, french: dict) -> list[tuple[str, str]]:
    """Plausible pairs without repeats, in first-seen order (none a TSV reader would misread)."""
    pairs = dict.fromkeys(pair(english, french))
    return [(en, fr) for en, fr in pairs if _plausible(en, fr) and "\t" not in en + fr and en[0] != "#"]


def fetch_indexes(lists: Path) -> dict[str, Path]:
    """Downloads the English and French indexes with apt into `lists` (Debian hosts only).

    Returns:
        {"en": path, "fr": path, "InRelease": path} of the decompressed indexes.

    Raises:
        subprocess.CalledProcessError: if apt-get fails.
    """
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", "update", f"-oDir::State::Lists={lists}", "-oAcquire::Languages=en,fr"],
        check=True,
    )
    stem = f"{MIRROR.split('://')[1].replace('/', '_')}_dists_{SUITE}"
    out = {"InRelease": lists / f"{stem}_InRelease"}
    for lang in ("en", "fr"):
        compressed = next(lists.glob(f"{stem}_main_i18n_Translation-{lang}*"))
        target = lists / f"Translation-{lang}"
        with open(target, "wb") as f:
            subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(compressed)], stdout=f, check=True)
        out[lang] = target
    return out


def write_snapshot(out: Path, indexes: dict[str, Path]) -> int:
    """Pairs the indexes and writes an xz-compressed TSV whose `#` header records provenance.

    Returns:
        The number of pairs written.
    """
    texts = {lang: indexes[lang].read_text("utf-8") for lang in ("en", "fr")}
    pairs = unique_pairs(parse_translations(texts["en"], "en"), parse_translations(texts["fr"], "fr"))
    release = indexes["InRelease"].read_text("utf-8", errors="replace")
    date = next((line[5:].strip() for line in release.splitlines() if line.startswith("Date:")), "?")
    digests = {lang: hashlib.sha256(texts[lang].encode()).hexdigest() for lang in texts}
    header = [
        "English-French pairs from Debian's translated package descriptions (DDTP)",
        f"source: {MIRROR}/dists/{SUITE}/main/i18n/Translation-{{en,fr}} (Release Date: {date})",
        f"Translation-en sha256 {digests['en']}",
        f"Translation-fr sha256 {digests['fr']}",
        f"written {dt.date.today().isoformat()} by python -m attnserve.models.ddtp_data; {len(pairs)} pairs",
        "the descriptions are part of their Debian packages and under their licences",
    ]
    lines = [f"# {h}" for h in header] + [f"{en}\t{fr}" for en, fr in pairs]
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        f.write("\n".join(lines) + "\n")
    return len(pairs)


def main() -> None:
    """Command line: fetch the current indexes and write a snapshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="snapshot to write (.tsv.xz)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"wrote {write_snapshot(args.out, fetch_indexes(Path(tmp)))} pairs to {args.out}")


if __name__ == "__main__":
    main()
